"""An attached worker restarted at its URL between two heartbeats is a death.

Compose's ``restart: on-failure`` brings a worker back at the same URL, with the same unit name,
within a second or so: fewer than the three missed heartbeats that count as a death. The new
process has empty storage, initial weights and no sync group, so it must not be taken for the
old one: ``/healthz`` answers with a random per-process instance id, and the supervisor treats a
changed id as a death (the unit is marked lost, the worker re-attached).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path
from typing import Any

from asyncflow.config import load_config
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.pool import attach_worker, free_port
from asyncflow.controller.supervisor import Supervisor
from asyncflow.transfer.storage import StorageUnit
from asyncflow.workers.server import WorkerServer
from asyncflow.workers.storage_role import StorageRole

TOKEN = "t0ken"


class Log:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def metrics(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)

    def now(self) -> float:
        return 0.0


class FakeIndex:
    """Records the units marked lost."""

    def __init__(self) -> None:
        self.lost: list[str] = []

    def mark_unit_lost(self, unit: str) -> dict[str, list[int]]:
        self.lost.append(unit)
        return {}


class Unused:
    """A collaborator a storage worker's recovery does not reach (no trainer, no sync)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} is not used here")


async def _serve(port: int) -> tuple[WorkerServer, asyncio.Task[None]]:
    server = WorkerServer(
        StorageRole(), StorageUnit("storage0"), TOKEN, port=port, ready_out=io.StringIO()
    )
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # until it has announced itself (it listens by then)
        await asyncio.sleep(0.01)
        if server.ready_out is None:
            break
    return server, task


async def _stop(server: WorkerServer, task: asyncio.Task[None]) -> None:
    server.stop()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_healthz_answers_a_fixed_instance_id_per_server(tmp_path: Path) -> None:
    port = free_port()
    server, task = await _serve(port)
    h = await attach_worker("storage", "storage0", f"http://127.0.0.1:{port}", TOKEN, 10)
    try:
        a, b = await h.get("/healthz"), await h.get("/healthz")
        assert a["ok"] is True
        assert isinstance(a.get("instance"), str) and len(a["instance"]) >= 16
        assert a == b
        await _stop(server, task)
        server, task = await _serve(port)
        c = await h.get("/healthz")
        assert c["instance"] != a["instance"]
    finally:
        await h.stop()
        await _stop(server, task)


async def test_worker_restarted_between_heartbeats_is_replaced(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server, task = await _serve(port)
    h = await attach_worker("storage", "storage0", url, TOKEN, 10)
    index = FakeIndex()
    workers = {"storage": [h]}
    fleet = Fleet(load_config(None, []), workers)  # respawn: an attached worker is not spawned

    heartbeat_s = 0.4
    sup = Supervisor(fleet, index, Log(), Unused(), Unused(), heartbeat_s, 10.0)
    try:
        async with sup.watching():
            await asyncio.sleep(heartbeat_s * 1.5)  # a heartbeat or two answered by the first
            assert not sup.deaths
            await _stop(server, task)  # the container exits and is restarted at once
            server, task = await _serve(port)
            for _ in range(100):  # well within three heartbeats
                if sup.deaths and workers["storage"][0] is not h:
                    break
                await asyncio.sleep(0.05)
            assert sup.deaths, "the restarted worker was taken for the old one"
            assert "restarted" in sup.deaths[0]["reason"]
            assert index.lost == ["storage0"]  # its unit's data is recomputed
            assert workers["storage"][0] is not h  # re-attached: a new handle...
            assert fleet.is_ready("storage0")  # ...serving again
            await asyncio.sleep(heartbeat_s * 2.5)  # and the new process is not taken for dead
            assert len(sup.deaths) == 1
    finally:
        await workers["storage"][0].stop()
        await h.stop()
        await _stop(server, task)
