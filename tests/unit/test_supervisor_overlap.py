"""Two workers of the weight-sync group (rollout engines, the actor) dying at once.

The group takes every actor and rollout handle: re-forming it while another slot is dead and not
yet replaced fails (the dead handle refuses the connection), and a failed recovery ends the run.
The supervisor leaves the group to the last of the overlapping recoveries, which forms it once
with every replacement and then lets all of them resume.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from asyncflow.controller.pool import WorkerError
from asyncflow.controller.supervisor import Supervisor


class FakeProc:
    def __init__(self) -> None:
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.returncode = -9
        self._exited.set()


class FakeWorker:
    """What the supervisor and the sync calls need of a spawned worker's handle."""

    def __init__(self, role: str, slot: int, generation: int = 0) -> None:
        self.name = f"{role}{slot}"
        self.role = role
        self.unit = self.name if generation == 0 else f"{self.name}.{generation}"
        self.url = f"http://{self.unit}"
        self.token = ""
        self.proc = FakeProc()
        self.info: dict[str, Any] = {}

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def check(self) -> None:
        if not self.alive:
            raise WorkerError(self.name, "connection refused")

    async def get(self, path: str, *, timeout: float = 30.0) -> dict[str, Any]:
        self.check()
        return {"policy_version": 0}

    async def stop(self) -> None:
        return None


class Log:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def metrics(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)

    def now(self) -> float:
        return 0.0


def _setup(
    rollouts: int, spawn_delay: dict[str, float]
) -> tuple[SimpleNamespace, Supervisor, list[list[str]]]:
    workers: dict[str, list[Any]] = {
        "actor": [FakeWorker("actor", 0)],
        "rollout": [FakeWorker("rollout", i) for i in range(rollouts)],
    }
    groups: list[list[str]] = []  # the units of every sync group formed

    async def call(worker: FakeWorker, op: str, params: Any = None) -> dict[str, Any]:
        worker.check()
        return {}

    p = SimpleNamespace(
        workers=workers,
        ready={},
        index=SimpleNamespace(mark_unit_lost=lambda unit: {}),
        log=Log(),
        units={},
        sync_lock=asyncio.Lock(),
        call=call,
        version=0,
        trained_version=0,
    )

    async def spawn(role: str, i: int, generation: int) -> FakeWorker:
        await asyncio.sleep(spawn_delay[f"{role}{i}"])
        return FakeWorker(role, i, generation)

    async def init_sync() -> None:
        members = [workers["actor"][0], *workers["rollout"]]
        for w in members:  # a dead member refuses the rendezvous: the group fails
            w.check()
        groups.append([w.unit for w in members])

    sup = Supervisor(p, spawn, init_sync, Path("/nonexistent"), 0.02, 5.0)  # type: ignore[arg-type]
    return p, sup, groups


async def _until_replaced(p: SimpleNamespace, sup: Supervisor, names: list[str]) -> None:
    def back(n: str) -> bool:
        event = p.ready.get(n)
        new = [w for ws in p.workers.values() for w in ws if w.name == n and w.unit != n]
        return event is not None and event.is_set() and bool(new) and new[0].alive

    async def all_back() -> None:
        while not all(back(n) for n in names):  # noqa: ASYNC110 - polls the fakes' state
            await asyncio.sleep(0.01)

    waiter = asyncio.ensure_future(all_back())
    try:
        await asyncio.wait({waiter, sup.fatal}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
        if sup.fatal.done():
            sup.fatal.result()  # raises the recovery's error
        assert waiter.done(), "the workers were not replaced in time"
    finally:
        waiter.cancel()
        await sup.close()


@pytest.mark.parametrize(
    ("dying", "delays"),
    [
        (["rollout0", "rollout1"], {"rollout0": 0.01, "rollout1": 0.2}),
        (["rollout0", "actor0"], {"rollout0": 0.01, "actor0": 0.2}),
        (["actor0", "rollout1"], {"actor0": 0.01, "rollout1": 0.2}),
    ],
)
async def test_two_sync_workers_dying_at_once_are_both_replaced(
    dying: list[str], delays: dict[str, float]
) -> None:
    p, sup, groups = _setup(2, delays)
    sup.watch_all()
    await asyncio.sleep(0)
    for name in dying:
        next(w for ws in p.workers.values() for w in ws if w.name == name).proc.kill()
    await _until_replaced(p, sup, dying)
    assert not [r for r in p.log.records if r.get("event") == "recovery_failed"]
    # the slots resume only with the group formed with every replacement
    assert groups, "the sync group was not formed anew"
    last = groups[-1]
    for name in dying:
        assert f"{name}.1" in last
    assert len(groups) == 1, f"the group was formed {len(groups)} times: {groups}"
    pushed = [r for r in p.log.records if r.get("event") == "weights_pushed"]
    assert len(pushed) == 1


async def test_slot_stays_paused_until_the_other_is_replaced() -> None:
    p, sup, groups = _setup(2, {"rollout0": 0.01, "rollout1": 0.3})
    sup.watch_all()
    await asyncio.sleep(0)
    p.workers["rollout"][0].proc.kill()
    p.workers["rollout"][1].proc.kill()
    await asyncio.sleep(0.15)  # rollout0 is back, rollout1 is not
    assert p.workers["rollout"][0].unit == "rollout0.1"
    assert not p.ready["rollout0"].is_set()  # it has no weights yet: its loops stay paused
    assert not groups
    await _until_replaced(p, sup, ["rollout0", "rollout1"])


async def test_a_death_during_the_regrouping_hands_it_over() -> None:
    """The replacement dies again before the group is formed: the next recovery forms it."""
    p, sup, groups = _setup(1, {"rollout0": 0.01})
    real_init = sup.init_sync
    first = True

    async def init_sync_killing_once() -> None:
        nonlocal first
        if first:  # the new rollout0 dies while the group forms
            first = False
            p.workers["rollout"][0].proc.kill()
            await asyncio.sleep(0.05)
        await real_init()

    sup.init_sync = init_sync_killing_once
    sup.watch_all()
    await asyncio.sleep(0)
    p.workers["rollout"][0].proc.kill()
    await asyncio.sleep(0.3)
    await _until_replaced(p, sup, ["rollout0"])
    assert p.workers["rollout"][0].unit == "rollout0.2"
    assert groups[-1] == ["actor0", "rollout0.2"]
