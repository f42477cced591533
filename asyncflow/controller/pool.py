"""One worker process: spawning it locally, attaching to a running one, talking to it.

A spawned worker is ``python -m asyncflow.workers --role ROLE`` in its own process. It dies with
the controller even on SIGKILL (``PR_SET_PDEATHSIG`` on Linux), so no run leaves orphans. An
attached worker (given by URL: docker compose, other hosts) is only talked to, never killed.
The run's workers as a whole -- which ones, their slots, replacing and stopping them -- are
:mod:`asyncflow.controller.fleet`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel


class WorkerError(RuntimeError):
    """A worker failed to start, died, or answered a request with an error."""

    def __init__(self, worker: str, message: str, status: int | None = None) -> None:
        super().__init__(f"worker {worker}: {message}")
        self.worker = worker
        self.status = status


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a rendezvous another process then listens on)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class WorkerHandle:
    """One worker: its URL, its storage unit's name, and (if we spawned it) its process."""

    name: str
    role: str
    url: str
    unit: str
    token: str
    proc: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def call(
        self, path: str, body: Mapping[str, Any] | None = None, *, timeout: float = 600.0
    ) -> dict[str, Any]:
        """POST JSON to the worker; raise :class:`WorkerError` on anything but a 200."""
        return await self._request("POST", path, dict(body or {}), timeout)

    async def get(self, path: str, *, timeout: float = 30.0) -> dict[str, Any]:
        return await self._request("GET", path, None, timeout)

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None, timeout: float
    ) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                async with self.session().request(method, self.url + path, json=body) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        text = data[:800].decode(errors="replace")
                        raise WorkerError(
                            self.name, f"{path}: HTTP {resp.status}: {text}", resp.status
                        )
                    out: dict[str, Any] = json.loads(data)
                    return out
        except TimeoutError:
            raise WorkerError(self.name, f"{path}: no answer within {timeout:.0f} s") from None
        except aiohttp.ClientError as e:
            raise WorkerError(self.name, f"{path}: {type(e).__name__}: {e}") from None

    async def stop(self, grace: float = 10.0) -> None:
        """Ask the worker to shut down; kill it if it doesn't (spawned workers only)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(WorkerError):
                await self.call("/v1/shutdown", timeout=2.0)
            try:
                async with asyncio.timeout(grace):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._session is not None:
            await self._session.close()


#: glibc returns freed blocks above 128 KiB to the OS and the next allocation faults them back
#: in page by page: a 2.6 MB batch pull took about 116 page faults, 11 with these settings
#: (freed memory stays in the heap for reuse; the heap stays at its peak size instead).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"

#: What every spawned worker's environment gets unless the environment already sets it.
#: OpenMP threads that spin while waiting steal the core from the engine's own Python thread and
#: from other workers; passive waiting made the tiny run 5-20x faster on 2 cores (docs/design.md).
WORKER_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GLIBC_TUNABLES": MALLOC_TUNABLES}


async def spawn_worker(
    role: str,
    name: str,
    token: str,
    settings: BaseModel | Mapping[str, Any] | None = None,
    *,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    start_timeout: float = 600.0,
    unit: str | None = None,
) -> WorkerHandle:
    """Start a worker process and wait for its ready line. ``unit`` names its storage unit
    (default: ``name``); a restarted worker gets a new unit name, since its data is new."""
    cmd = [
        sys.executable,
        "-m",
        "asyncflow.workers",
        "--role",
        role,
        "--name",
        unit or name,
        "--host",
        host,
        "--port",
        "0",
        "--settings",
        (
            settings.model_dump_json()
            if isinstance(settings, BaseModel)
            else json.dumps(dict(settings or {}))
        ),
    ]
    full_env = {**WORKER_ENV_DEFAULTS, **os.environ, **(env or {}), "ASYNCFLOW_TOKEN": token}
    log_path = None
    stderr: Any = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once per worker start
        log_path = log_dir / f"{name}.log"
        stderr = open(log_path, "ab")  # noqa: SIM115, ASYNC230 - the child owns it
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env=full_env,
        preexec_fn=_die_with_parent,
    )
    if stderr is not None:
        stderr.close()
    try:
        async with asyncio.timeout(start_timeout):
            ready = await _ready_line(proc, name, log_path)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return WorkerHandle(name, role, ready["url"], ready["unit"], token, proc, log_path, ready)


def _log_tail(log_path: Path | None, lines: int = 12) -> str:
    """The end of a worker's log, for an error message: why it stopped is usually there."""
    if log_path is None:
        return " (see its stderr)"
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f" (see {log_path})"
    tail = [x for x in text.splitlines() if x.strip()][-lines:]
    if not tail:
        return f" (its log {log_path} is empty)"
    body = "\n    ".join(x[:300] for x in tail)
    return f"; the end of its log {log_path}:\n    {body}"


async def _ready_line(
    proc: asyncio.subprocess.Process, name: str, log_path: Path | None = None
) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            code = await proc.wait()
            raise WorkerError(
                name, f"exited with code {code} before it was ready{_log_tail(log_path)}"
            )
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue  # a library printed to stdout; the ready line is JSON
        if isinstance(msg, dict) and msg.get("event") == "ready":
            return msg


async def attach_worker(
    role: str, name: str, url: str, token: str, wait_s: float = 600.0
) -> WorkerHandle:
    """A worker that already runs elsewhere (compose, another host): ask it who it is,
    waiting up to ``wait_s`` for it to come up; a wrong token or role fails at once."""
    h = WorkerHandle(name, role, url.rstrip("/"), "", token)
    deadline = asyncio.get_running_loop().time() + wait_s
    try:
        while True:
            try:
                info = await h.get("/v1/info", timeout=30.0)
                break
            except WorkerError as e:
                if e.status is not None or asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(1.0)  # not listening yet
        if info.get("role") != role:
            raise WorkerError(name, f"{url} runs role {info.get('role')!r}, expected {role!r}")
    except BaseException:
        await h.stop()  # closes its HTTP session (an attached worker itself is not stopped)
        raise
    h.unit = str(info["unit"])
    h.info = info
    return h
