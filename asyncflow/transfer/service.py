"""The HTTP face of a storage unit, and the request hygiene every worker endpoint shares.

Routes (all under ``/v1/storage``, all need ``Authorization: Bearer <run token>``):

=========  ==========================================  ===========================================
method     body                                        answer
=========  ==========================================  ===========================================
POST get   JSON ``{"columns": {col: [row ids]}}``      a frame (safetensors layout): ``col`` or
                                                       ``col.values`` + ``col.lengths`` per column
POST put   a frame; ``__metadata__.rows`` = row ids    JSON ``{"shapes": {col: [[...], ...]}}``
POST free  JSON ``{"rows": [...], "columns": [...]?}``  JSON ``{"freed": n}``
GET stats  --                                          JSON: bytes and rows held per column
=========  ==========================================  ===========================================

Bad requests get a 4xx with a JSON ``{"error": ...}`` and change nothing: a missing or wrong
token is 401 (on every path but ``/healthz``), malformed JSON, ids or frames 400, unknown rows
or routes 404, a wrong method 405, a body over the size limit 413, a compressed body 415. Each
refusal is counted by kind (:data:`REFUSAL_KINDS`; workers show the counts on ``/v1/info``); 500
is only for a bug or an engine failure. Ids are integers in ``[0, 2**63)``, at most
:data:`MAX_IDS` per list. Nothing received is ever unpickled.
"""

from __future__ import annotations

import hmac
import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from asyncflow.transfer.framing import FrameError, decode, encode, frame_size
from asyncflow.transfer.storage import ColumnData, MissingRows, StorageUnit

MAX_IDS = 1_000_000
MAX_ID = (1 << 63) - 1  #: ids travel as int64
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: the counter (in ``WorkerServer.counters``, shown on ``/v1/info``) each refusal increments
REFUSAL_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_encoding",
}


class BadRequest(ValueError):
    """A request the worker refuses (mapped to HTTP 400 unless ``status`` says otherwise)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def count(counters: dict[str, int], kind: str) -> None:
    counters[kind] = counters.get(kind, 0) + 1


def auth_middleware(token: str, counters: dict[str, int]) -> Any:
    """Refuse any request without the run's bearer token; map errors to JSON 4xx answers.

    Every refusal is counted in ``counters`` by kind (:data:`REFUSAL_KINDS`); answers of 500
    (a bug or an engine failure, never the client's input) count as ``errors``."""
    expected = f"Bearer {token}".encode()

    def refuse(status: int, message: str) -> web.Response:
        count(counters, REFUSAL_KINDS.get(status, f"http_{status}"))
        return json_error(status, message)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz":
            # surrogatepass: a header that is not UTF-8 gives bytes that never equal ``expected``
            got = request.headers.get("Authorization", "").encode("utf-8", "surrogatepass")
            if not hmac.compare_digest(got, expected):
                return refuse(401, "missing or wrong run token")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            resp = refuse(415, f"Content-Encoding {encoding!r} is not accepted; send plain bodies")
            resp.force_close()  # the unread body may not even decompress: drop the connection
            return resp
        try:
            return await handler(request)
        except BadRequest as e:
            return refuse(e.status, str(e))
        except web.HTTPRequestEntityTooLarge:
            return refuse(413, "request body too large")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = refuse(e.status, e.reason)
            if "Allow" in e.headers:
                resp.headers["Allow"] = e.headers["Allow"]
            return resp
        except (RequestPayloadError, HttpProcessingError) as e:  # broken chunking, cut bodies
            return refuse(400, f"malformed request body: {e}")
        except Exception as e:  # a bug or an engine failure: say what, keep serving
            count(counters, "errors")
            traceback.print_exc(file=sys.stderr)
            return json_error(500, f"{type(e).__name__}: {e}")

    return middleware


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (UTF-8, whatever charset the Content-Type claims)."""
    raw = await request.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit int, deep nesting
        raise BadRequest(f"body is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def is_id(v: Any) -> bool:
    return type(v) is int and 0 <= v <= MAX_ID


def id_list(value: Any, what: str = "rows") -> list[int]:
    """Validate a list of integer ids in ``[0, 2**63)``."""
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list of integers")
    if len(value) > MAX_IDS:
        raise BadRequest(f"{what}: at most {MAX_IDS} ids per request, got {len(value)}")
    for v in value:
        if not is_id(v):
            shown = repr(v)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise BadRequest(f"{what} must be integers in [0, 2**63), got {shown}")
    return value


def str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"{what} must be a list of non-empty strings")
    return value


async def read_body(request: web.Request) -> bytearray:
    """The whole body in one preallocated, writable buffer (tensors map onto it in place)."""
    size = request.content_length
    if size is None:
        return bytearray(await request.read())
    if size > request.app["max_body"]:
        raise BadRequest(f"body of {size} bytes exceeds {request.app['max_body']}", 413)
    buf = bytearray(size)
    view = memoryview(buf)
    pos = 0
    async for chunk in request.content.iter_any():
        n = len(chunk)
        if pos + n > size:
            raise BadRequest("body longer than its Content-Length")
        view[pos : pos + n] = chunk
        pos += n
    if pos != size:
        raise BadRequest("body shorter than its Content-Length")
    return buf


def column_tensors(name: str, data: ColumnData) -> dict[str, Any]:
    if data.lengths is None:
        return {name: data.values}
    return {f"{name}.values": data.values, f"{name}.lengths": data.lengths}


async def send_frame(request: web.Request, bufs: list[Any]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = frame_size(bufs)
    await resp.prepare(request)
    for b in bufs:
        await resp.write(b)
    await resp.write_eof()
    return resp


def storage_routes(unit: StorageUnit) -> list[web.RouteDef]:
    """The ``/v1/storage`` routes serving ``unit``."""

    async def get(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        cols = body.get("columns")
        if not isinstance(cols, dict) or not cols:
            raise BadRequest('"columns" must be an object {column: [row ids]}')
        tensors: dict[str, Any] = {}
        for name, rows in cols.items():
            try:
                data = unit.get(name, id_list(rows, f"columns[{name!r}]"))
            except MissingRows as e:
                raise BadRequest(str(e.args[0]), 404) from None
            except ValueError as e:  # rows of mismatched ranks cannot travel as one column
                raise BadRequest(str(e)) from None
            tensors.update(column_tensors(name, data))
        return await send_frame(request, encode(tensors, {"unit": unit.name}))

    async def put(request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        try:
            tensors, meta = decode(body)
        except FrameError as e:
            raise BadRequest(f"malformed frame: {e}") from None
        except (ValueError, TypeError, OverflowError, RecursionError, RuntimeError) as e:
            # the header is untrusted JSON: any failure to read it is the sender's
            raise BadRequest(f"malformed frame: {type(e).__name__}: {str(e)[:200]}") from None
        rows = id_list(meta.get("rows"), "__metadata__.rows")
        if len(set(rows)) != len(rows):
            raise BadRequest("__metadata__.rows: duplicate row ids")
        columns = _group_columns(tensors)
        for name, data in columns.items():
            if len(data) != len(rows):
                raise BadRequest(f"{name!r} has {len(data)} rows, metadata names {len(rows)}")
        # everything is validated before the first column is stored: a refusal changes nothing
        out = {name: unit.put(name, rows, data) for name, data in columns.items()}
        return web.json_response({"shapes": {k: [list(s) for s in v] for k, v in out.items()}})

    async def free(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        rows = id_list(body.get("rows"))
        cols = body.get("columns")
        freed = unit.free(rows, None if cols is None else str_list(cols, "columns"))
        return web.json_response({"freed": freed})

    async def stats(request: web.Request) -> web.StreamResponse:
        return web.json_response(dict(unit.stats()))

    return [
        web.post("/v1/storage/get", get),
        web.post("/v1/storage/put", put),
        web.post("/v1/storage/free", free),
        web.get("/v1/storage/stats", stats),
    ]


_LENGTH_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _group_columns(tensors: dict[str, torch.Tensor]) -> dict[str, ColumnData]:
    """Columns of a put frame: ``col`` (rows along dim 0) or ``col.values`` + ``col.lengths``."""
    out: dict[str, ColumnData] = {}
    for name, t in tensors.items():
        if name.endswith(".lengths"):
            if name.removesuffix(".lengths") + ".values" not in tensors:
                raise BadRequest(f"{name!r} without its .values tensor")
            continue
        base = name.removesuffix(".values")
        if not base:
            raise BadRequest("a column needs a non-empty name")
        if base in out or (base != name and base in tensors):
            raise BadRequest(f"column {base!r} is given twice (plain and ragged)")
        if t.dim() == 0:
            raise BadRequest(f"{name!r}: a column needs a leading row dimension")
        if base == name:
            out[name] = ColumnData(t)
            continue
        lengths = tensors.get(f"{base}.lengths")
        if lengths is None or lengths.dim() != 1 or lengths.dtype not in _LENGTH_DTYPES:
            raise BadRequest(f"{base!r}: ragged values need a 1-d integer .lengths tensor")
        if (lengths < 0).any():
            raise BadRequest(f"{base!r}: negative lengths")
        if int(lengths.sum()) != t.shape[0]:
            raise BadRequest(
                f"{base!r}: .lengths sum to {int(lengths.sum())}, .values has {t.shape[0]} rows"
            )
        out[base] = ColumnData(t, lengths.to(torch.int64))
    return out
