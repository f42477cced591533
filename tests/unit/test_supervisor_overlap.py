"""Two workers of the weight-sync group (rollout engines, the actor) dying at once.

The group takes every actor and rollout handle: re-forming it while another slot is dead and not
yet replaced fails (the dead handle refuses the connection), and a failed recovery ends the run.
The supervisor leaves the group to the last of the overlapping recoveries, which forms it once
with every replacement and then lets all of them resume.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from asyncflow.config import load_config
from asyncflow.controller.checkpoints import Checkpoints
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.loader import PromptLoader
from asyncflow.controller.pool import WorkerError
from asyncflow.controller.retry import Retry
from asyncflow.controller.stages import Admission
from asyncflow.controller.supervisor import Supervisor
from asyncflow.controller.sync import Versions, WeightSync
from asyncflow.transfer.index import SampleIndex

CFG = load_config(None, [])


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

    async def call(self, path: str, body: Any = None, *, timeout: float = 600.0) -> dict[str, Any]:
        self.check()
        return ANSWERS[path.removeprefix("/v1/work/")]

    async def stop(self) -> None:
        return None


#: what a worker answers to each op these tests make (the fields its answer model requires)
ANSWERS: dict[str, dict[str, Any]] = {
    "sync_init": {"ok": True},
    "sync_send": {"version": 0, "metrics": {"seconds": 0.0, "bytes": 0}},
    "sync_recv": {"metrics": {"version": 0, "recv_s": 0.0, "total_s": 0.0, "reload": ""}},
    "load": {"ok": True, "version": 0},
}


class Log:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def metrics(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)

    def now(self) -> float:
        return 0.0


class FakeIndex:
    def mark_unit_lost(self, unit: str) -> dict[str, list[int]]:
        return {}


class DelayedFleet(Fleet):
    """The fleet, with each slot's replacement (a new FakeWorker) spawned after a delay."""

    def __init__(self, workers: dict[str, list[Any]], delays: dict[str, float]) -> None:
        super().__init__(CFG, workers)
        self.delays = delays

    async def respawn(self, role: str, i: int, generation: int) -> Any:
        await asyncio.sleep(self.delays[f"{role}{i}"])
        return FakeWorker(role, i, generation)


class RecordingSync(WeightSync):
    """The weight sync, with a scripted group: a dead member refuses the rendezvous (the group
    fails); records the units of every group formed. ``before`` runs once, before the first."""

    def __init__(self, fleet: Fleet, log: Log, groups: list[list[str]]) -> None:
        super().__init__(CFG, fleet, Versions(), log, Retry(log, 32))
        self.groups = groups
        self.before: Callable[[], Awaitable[None]] | None = None

    async def init_group(self) -> None:
        if self.before is not None:
            before, self.before = self.before, None
            await before()
        members = [self.fleet.workers["actor"][0], *self.fleet.workers["rollout"]]
        for w in members:  # a dead member refuses the rendezvous: the group fails
            w.check()
        self.groups.append([w.unit for w in members])


def _setup(
    rollouts: int, spawn_delay: dict[str, float]
) -> tuple[DelayedFleet, Log, RecordingSync, Supervisor, list[list[str]]]:
    workers: dict[str, list[Any]] = {
        "actor": [FakeWorker("actor", 0)],
        "rollout": [FakeWorker("rollout", i) for i in range(rollouts)],
    }
    groups: list[list[str]] = []  # the units of every sync group formed
    log = Log()
    fleet = DelayedFleet(workers, spawn_delay)
    sync = RecordingSync(fleet, log, groups)
    versions = Versions()  # nothing trained yet: a replaced actor keeps its initial weights
    index = SampleIndex()
    admission = Admission(CFG, index, PromptLoader(1, 0), versions)
    checkpoints = Checkpoints(Path("/nonexistent"), 2, fleet, log, versions, admission, index)
    sup = Supervisor(fleet, FakeIndex(), log, checkpoints, sync, 0.02, 5.0)
    return fleet, log, sync, sup, groups


async def _until_replaced(fleet: Fleet, sup: Supervisor, names: list[str]) -> None:
    def back(n: str) -> bool:
        new = [w for ws in fleet.workers.values() for w in ws if w.name == n and w.unit != n]
        return fleet.is_ready(n) and bool(new) and new[0].alive

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
    fleet, log, _, sup, groups = _setup(2, delays)
    async with sup.watching():
        await asyncio.sleep(0)
        for name in dying:
            next(w for ws in fleet.workers.values() for w in ws if w.name == name).proc.kill()
        await _until_replaced(fleet, sup, dying)
    assert not [r for r in log.records if r.get("event") == "recovery_failed"]
    # the slots resume only with the group formed with every replacement
    assert groups, "the sync group was not formed anew"
    last = groups[-1]
    for name in dying:
        assert f"{name}.1" in last
    assert len(groups) == 1, f"the group was formed {len(groups)} times: {groups}"
    pushed = [r for r in log.records if r.get("event") == "weights_pushed"]
    assert len(pushed) == 1


async def test_slot_stays_paused_until_the_other_is_replaced() -> None:
    fleet, _, _, sup, groups = _setup(2, {"rollout0": 0.01, "rollout1": 0.3})
    async with sup.watching():
        await asyncio.sleep(0)
        fleet.workers["rollout"][0].proc.kill()
        fleet.workers["rollout"][1].proc.kill()
        await asyncio.sleep(0.15)  # rollout0 is back, rollout1 is not
        assert fleet.workers["rollout"][0].unit == "rollout0.1"
        assert not fleet.is_ready("rollout0")  # it has no weights yet: its loops stay paused
        assert not groups
        await _until_replaced(fleet, sup, ["rollout0", "rollout1"])


async def test_a_death_during_the_regrouping_hands_it_over() -> None:
    """The replacement dies again before the group is formed: the next recovery forms it."""
    fleet, _, sync, sup, groups = _setup(1, {"rollout0": 0.01})

    async def kill_the_new_rollout0() -> None:  # it dies while the group forms
        fleet.workers["rollout"][0].proc.kill()
        await asyncio.sleep(0.05)

    sync.before = kill_the_new_rollout0
    async with sup.watching():
        await asyncio.sleep(0)
        fleet.workers["rollout"][0].proc.kill()
        await asyncio.sleep(0.3)
        await _until_replaced(fleet, sup, ["rollout0"])
    assert fleet.workers["rollout"][0].unit == "rollout0.2"
    assert groups[-1] == ["actor0", "rollout0.2"]
