"""The HTTP server every worker process runs: auth, a storage unit, and its role's endpoints.

A worker is one OS process, one event loop. It serves:

- ``GET /healthz`` (no token: liveness only) and ``GET /v1/info`` (role, pid, version);
- the storage unit's ``/v1/storage/*`` routes, so other workers pull what this one produced;
- ``POST /v1/work/{op}``: the role's operations. The body is JSON: ``{"batch": BatchMeta,
  "units": {unit: url}, "params": {...}}``. The worker pulls the batch's inputs straight from
  the units named, computes, keeps its outputs in its own unit, and answers with their metadata
  (``{"produced": {column: {"shapes", "dtype", "version"}}, "metrics": {...}}``). Each op's
  params and answer are typed in :mod:`asyncflow.roles.ops` (``OPS``); the params are checked
  there before the op runs;
- ``POST /v1/shutdown``.

When ready it prints one JSON line ``{"event": "ready", "url": ..., "unit": ...}`` on stdout;
that is how a spawning controller learns the port it bound (``--port 0`` picks a free one). A
worker process sends everything else its stdout gets to its log from the start (see
:func:`detach_stdout`).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TextIO, TypeVar

from aiohttp import web
from yarl import URL

from asyncflow.roles.ops import MAX_ID as OPS_MAX_ID
from asyncflow.roles.ops import MAX_IDS as OPS_MAX_IDS
from asyncflow.roles.ops import OPS, InvalidParams, Params, check
from asyncflow.transfer.client import READ_BUFSIZE, TransferClient
from asyncflow.transfer.index import BatchMeta, FieldMeta
from asyncflow.transfer.service import (
    MAX_ID,
    MAX_IDS,
    BadRequest,
    auth_middleware,
    id_list,
    read_json,
    storage_routes,
)
from asyncflow.transfer.storage import StorageUnit

assert (OPS_MAX_ID, OPS_MAX_IDS) == (MAX_ID, MAX_IDS)  # ops.py keeps its own (no torch there)

P = TypeVar("P", bound=Params)
Op = Callable[["WorkRequest[Any]"], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class WorkRequest(Generic[P]):
    """One unit of work handed to a role: the batch to pull and the op's parameters, checked
    against the op's params model (:data:`asyncflow.roles.ops.OPS`)."""

    batch: BatchMeta | None
    params: P
    client: TransferClient
    unit: StorageUnit


def parse_params(model: type[P], raw: dict[str, Any], prefix: str = "params") -> P:
    """``raw`` as a ``model``, or a 400 naming the first bad parameter."""
    try:
        return check(model, raw, prefix)
    except InvalidParams as e:
        raise BadRequest(str(e)) from None


def need_batch(batch: BatchMeta | None, op: str, columns: Sequence[str] = ()) -> BatchMeta:
    """The request's batch: present, with at least one row and the ``columns`` the op reads."""
    if batch is None:
        raise BadRequest(f"{op} needs a batch")
    if not batch.rows:
        raise BadRequest(f"{op} needs a batch of at least one row, got an empty batch")
    missing = [c for c in columns if c not in batch.fields]
    if missing:
        raise BadRequest(
            f"{op}: the batch has no column {missing[0]!r} (it needs {list(columns)}; "
            f"it has {sorted(batch.fields)})"
        )
    return batch


class Role(Protocol):
    """What a worker role provides to the server."""

    name: str

    async def start(self) -> None: ...

    def ops(self) -> Mapping[str, Op]: ...

    def info(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


@dataclass
class WorkerServer:
    role: Role
    unit: StorageUnit
    token: str
    host: str = "127.0.0.1"
    port: int = 0
    max_body: int = 1 << 30
    counters: dict[str, int] = field(default_factory=dict)
    busy_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    #: where the ready line goes (``None``: stdout), closed after it: the worker process's entry
    #: point passes what :func:`detach_stdout` kept, never in-process (it would redirect the
    #: embedding program's stdout)
    ready_out: TextIO | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _client: TransferClient | None = None

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[auth_middleware(self.token, self.counters)],
            client_max_size=self.max_body,
        )
        app["max_body"] = self.max_body
        app.add_routes(storage_routes(self.unit))
        app.add_routes(
            [
                web.get("/healthz", self._healthz),
                web.get("/v1/info", self._info),
                web.post("/v1/work/{op}", self._work),
                web.post("/v1/shutdown", self._shutdown),
            ]
        )
        return app

    async def serve(self) -> None:
        """Start the role, bind, announce readiness, serve until shut down."""
        unknown = set(self.role.ops()) - set(OPS.get(self.role.name, {}))
        if unknown:  # every op's params are checked against its model before it runs
            raise RuntimeError(
                f"role {self.role.name!r} serves ops with no entry in asyncflow.roles.ops.OPS: "
                f"{sorted(unknown)}"
            )
        await self.role.start()
        self._client = TransferClient({}, self.token)
        runner = web.AppRunner(self.app(), access_log=None, read_bufsize=READ_BUFSIZE)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://{self.host}:{port}"
        ready = {
            "event": "ready",
            "url": url,
            "unit": self.unit.name,
            "role": self.role.name,
            "pid": os.getpid(),
        }
        print(json.dumps(ready), file=self.ready_out or sys.stdout, flush=True)
        if self.ready_out is not None:
            self.ready_out.close()  # the controller reads no further
            self.ready_out = None
        try:
            await self._stop.wait()
        finally:
            await self._client.aclose()
            await self.role.close()
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        # ``instance``: random, fixed for this server's life. A worker restarted at the same URL
        # between two heartbeats (compose's restart policy) answers with a new one, so the
        # supervisor tells it from the process it replaced (the pid is 1 in every container).
        # Not a secret: /healthz needs no token.
        instance = self.__dict__.setdefault("_instance", secrets.token_hex(8))
        return web.json_response({"ok": True, "instance": instance})

    async def _info(self, request: web.Request) -> web.Response:
        up = time.monotonic() - self.started
        return web.json_response(
            {
                "role": self.role.name,
                "unit": self.unit.name,
                "pid": os.getpid(),
                "busy_s": self.busy_s,
                "uptime_s": up,
                "counters": self.counters,
                **self.role.info(),
            }
        )

    async def _work(self, request: web.Request) -> web.Response:
        # The body is validated before the op is looked up: a malformed request is a 400
        # whatever the op, and nothing (not even the client's unit map) changes on a refusal.
        op_name = request.match_info["op"]
        body = await read_json(request)
        batch = _parse_batch(body.get("batch"))
        units = _parse_units(body.get("units", {}))
        params = body.get("params", {})
        if not isinstance(params, dict):
            raise BadRequest('"params" must be an object')
        ops = self.role.ops()
        if op_name not in ops:
            raise BadRequest(
                f"role {self.role.name!r} has no op {op_name!r}; it has {sorted(ops)}", 404
            )
        # then the op's params, against its model (the op itself checks its batch)
        checked = parse_params(OPS[self.role.name][op_name].params, params)
        assert self._client is not None
        self._client.units.update(units)
        t0 = time.monotonic()
        try:
            out = await ops[op_name](WorkRequest(batch, checked, self._client, self.unit))
        except LookupError as e:  # the request named rows/indices that don't exist
            raise BadRequest(str(e), 404) from None
        finally:
            self.busy_s += time.monotonic() - t0
        return web.json_response(out)

    async def _shutdown(self, request: web.Request) -> web.Response:
        # Read the (ignored) body and close the connection: a body left unread keeps the
        # connection lingering, and the server's cleanup would wait ~10 s for it.
        await request.read()
        resp = web.json_response({"ok": True})
        resp.force_close()
        self._stop.set()
        return resp

    def stop(self) -> None:
        self._stop.set()


def _parse_units(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise BadRequest('"units" must map unit names to http URLs')
    for name, url in raw.items():
        ok = False
        if name and isinstance(url, str):
            try:
                parsed = URL(url)
                ok = parsed.scheme in ("http", "https") and bool(parsed.host)
            except (ValueError, TypeError):
                ok = False
        if not ok:
            raise BadRequest(f'"units": {name!r} must map to an http URL, got {url!r:.80}')
    return raw


def _field_meta(col: str, entry: Any) -> FieldMeta:
    if not (isinstance(entry, list) and len(entry) == 4):
        raise BadRequest(
            f"batch metadata: fields[{col!r}] entries are [unit, shape, dtype, version]"
        )
    unit, shape, dtype, version = entry
    if not (isinstance(unit, str) and unit and isinstance(dtype, str) and type(version) is int):
        raise BadRequest(
            f"batch metadata: fields[{col!r}]: unit and dtype must be strings, version an integer"
        )
    if not isinstance(shape, list) or not all(type(s) is int and 0 <= s <= MAX_ID for s in shape):
        raise BadRequest(f"batch metadata: fields[{col!r}]: shapes are lists of sizes >= 0")
    return FieldMeta(unit, tuple(shape), dtype, version)


def _parse_batch(raw: Any) -> BatchMeta | None:
    """A ``BatchMeta`` from untrusted JSON: every part checked for type, sign and length."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRequest('"batch" must be an object')
    missing = [k for k in ("task", "rows", "groups", "meta", "fields") if k not in raw]
    if missing:
        raise BadRequest(f"malformed batch metadata: missing {missing}")
    if not isinstance(raw["task"], str):
        raise BadRequest("batch metadata: task must be a string")
    rows = id_list(raw["rows"], "batch.rows")
    groups = raw["groups"]
    if not isinstance(groups, list) or not all(type(g) is int and g >= 0 for g in groups):
        raise BadRequest("batch metadata: groups must be a list of non-negative integers")
    meta = raw["meta"]
    if not isinstance(meta, list) or not all(isinstance(m, dict) for m in meta):
        raise BadRequest("batch metadata: meta must be a list of objects")
    fields = raw["fields"]
    if not isinstance(fields, dict):
        raise BadRequest("batch metadata: fields must be an object {column: [...]}")
    for what, seq in (("groups", groups), ("meta", meta), *fields.items()):
        if not isinstance(seq, list) or len(seq) != len(rows):
            raise BadRequest(f"batch metadata: {what} needs one entry per row ({len(rows)} rows)")
    lease = raw.get("lease", -1)
    if type(lease) is not int or lease < -1:
        raise BadRequest(f"batch metadata: batch.lease must be an integer >= -1, got {lease!r:.40}")
    return BatchMeta(
        raw["task"],
        rows,
        groups,
        {col: [_field_meta(col, e) for e in entries] for col, entries in fields.items()},
        meta,
        lease,
    )


def log(msg: str) -> None:
    """Worker diagnostics go to stderr; stdout carries only the ready line."""
    print(msg, file=sys.stderr, flush=True)


def stdout_to_stderr() -> None:
    """Send everything later written to stdout (fd 1) to stderr (fd 2), the worker's log.

    The controller reads a spawned worker's stdout only until the ready line; libraries keep
    printing there (vLLM logs a warning on every weight reload), and once the unread pipe holds
    64 KiB the next write blocks the worker forever. Child processes inherit the new fd 1."""
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def detach_stdout() -> TextIO:
    """Point stdout at stderr (:func:`stdout_to_stderr`) now, and return a private stream on the
    old stdout (the controller's pipe) for the ready line alone.

    Called before the role is built: a reward function prints at import, and the child
    processes a role starts (reward scorer processes, engine processes) inherit fd 1 -- had they
    inherited the pipe, what they print would be lost, and would block them once it is full.
    The kept descriptor is not inheritable, so no child process holds the pipe open."""
    sys.stdout.flush()
    kept = os.dup(sys.stdout.fileno())  # os.dup: non-inheritable
    stdout_to_stderr()
    return os.fdopen(kept, "w", encoding="utf-8")
