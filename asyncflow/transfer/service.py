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
token is 401, malformed JSON or ids 400, unknown rows 404, a body over the size limit 413.
Nothing received is ever unpickled.
"""

from __future__ import annotations

import hmac
import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from asyncflow.transfer.framing import FrameError, decode, encode, frame_size
from asyncflow.transfer.storage import ColumnData, MissingRows, StorageUnit

MAX_IDS = 1_000_000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ValueError):
    """A request the worker refuses (mapped to HTTP 400 unless ``status`` says otherwise)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def auth_middleware(token: str, counters: dict[str, int]) -> Any:
    """Refuse any request without the run's bearer token; map errors to JSON 4xx answers."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz":
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                counters["unauthorized"] = counters.get("unauthorized", 0) + 1
                return json_error(401, "missing or wrong run token")
        try:
            return await handler(request)
        except BadRequest as e:
            counters["bad_request"] = counters.get("bad_request", 0) + 1
            return json_error(e.status, str(e))
        except web.HTTPRequestEntityTooLarge:
            counters["too_large"] = counters.get("too_large", 0) + 1
            return json_error(413, "request body too large")
        except web.HTTPException:
            raise
        except Exception as e:  # a bug or an engine failure: say what, keep serving
            counters["errors"] = counters.get("errors", 0) + 1
            traceback.print_exc(file=sys.stderr)
            return json_error(500, f"{type(e).__name__}: {e}")

    return middleware


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def id_list(value: Any, what: str = "rows") -> list[int]:
    """Validate a list of non-negative integer ids."""
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list of integers")
    if len(value) > MAX_IDS:
        raise BadRequest(f"{what}: at most {MAX_IDS} ids per request")
    for v in value:
        if type(v) is not int or v < 0:
            raise BadRequest(f"{what} must be non-negative integers, got {v!r}")
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
                raise BadRequest(str(e), 404) from None
            tensors.update(column_tensors(name, data))
        return await send_frame(request, encode(tensors, {"unit": unit.name}))

    async def put(request: web.Request) -> web.StreamResponse:
        try:
            tensors, meta = decode(await read_body(request))
        except FrameError as e:
            raise BadRequest(f"malformed frame: {e}") from None
        rows = id_list(meta.get("rows"), "__metadata__.rows")
        shapes = {}
        for name, data in _group_columns(tensors).items():
            if len(data) != len(rows):
                raise BadRequest(f"{name!r} has {len(data)} rows, metadata names {len(rows)}")
            shapes[name] = data
        out = {name: unit.put(name, rows, data) for name, data in shapes.items()}
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


def _group_columns(tensors: dict[str, Any]) -> dict[str, ColumnData]:
    out: dict[str, ColumnData] = {}
    for name, t in tensors.items():
        if name.endswith(".lengths"):
            continue
        if name.endswith(".values"):
            base = name.removesuffix(".values")
            lengths = tensors.get(f"{base}.lengths")
            if lengths is None or lengths.dim() != 1 or int(lengths.sum()) != t.shape[0]:
                raise BadRequest(f"{base!r}: ragged values need matching .lengths")
            if (lengths < 0).any():
                raise BadRequest(f"{base!r}: negative lengths")
            out[base] = ColumnData(t, lengths)
        else:
            if t.dim() == 0:
                raise BadRequest(f"{name!r}: a column needs a leading row dimension")
            out[name] = ColumnData(t)
    return out


def make_app(unit: StorageUnit, token: str, *, max_body: int = 1 << 30) -> web.Application:
    """A minimal worker app serving only a storage unit (for tests and benchmarks)."""
    counters: dict[str, int] = {}
    app = web.Application(middlewares=[auth_middleware(token, counters)], client_max_size=max_body)
    app["max_body"] = max_body
    app["counters"] = counters
    app.add_routes(storage_routes(unit))

    async def healthz(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True, "unit": unit.name})

    app.add_routes([web.get("/healthz", healthz)])
    return app
