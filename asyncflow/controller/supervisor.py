"""Worker supervision: notice a dead worker within seconds, lose nothing, carry on.

For every worker the supervisor runs one watch task: a spawned worker is watched through its
process (its exit is noticed at once), an attached one through ``/healthz`` heartbeats -- three
missed in a row, or an answer with another ``instance`` id (the worker was restarted at the same
URL between two probes: same unit name, but empty storage, initial weights, no sync group) is a
death. When a worker dies:

1. its slot is marked not ready (:meth:`Fleet.pause`: loops for it pause; requests in flight
   fail and give their rows back to the index);
2. its storage unit is marked lost in the index, so every field it held -- and everything derived
   from those fields -- is recomputed from the prompts (lineage);
3. it is replaced: a spawned worker is restarted with a new storage-unit name; an attached one is
   waited for at its URL (its orchestrator restarts it);
4. state is restored: a trainer loads the checkpoint of the version it had reached
   (:meth:`Checkpoints.load_trainer`: the actor from ``step_N/``, the PPO critic from
   ``step_N/critic/``; so keep ``checkpoint.every=1`` where trainer faults must be survived),
   and the weight-sync group is formed anew with every rollout engine, which then receives the
   current weights (:meth:`WeightSync.regroup`). The group must hold every actor and rollout
   slot: while another of those slots is still being replaced (two died at once), the group is
   left to the last of those recoveries, which re-forms it once for all of them;
5. the slot is marked ready and the loops resume.

A recovery that fails fails the run: :meth:`Supervisor.wait_fatal` raises it (it runs beside the
stage loops). Watches live within :meth:`Supervisor.watching`, which ends them before the run
stops its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import AsyncIterator
from typing import Any

from asyncflow.controller.checkpoints import Checkpoints
from asyncflow.controller.concurrency import background
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.pool import WorkerError, WorkerHandle
from asyncflow.controller.retry import Retry
from asyncflow.controller.sync import WeightSync
from asyncflow.runlog import RunLog
from asyncflow.transfer.index import SampleIndex

#: the roles in the weight-sync group
SYNC_ROLES = ("actor", "rollout")


class Supervisor:
    """Watches the fleet's workers and replaces the dead ones (see the module's docstring)."""

    def __init__(
        self,
        fleet: Fleet,
        index: SampleIndex,
        log: RunLog,
        checkpoints: Checkpoints,
        sync: WeightSync,
        heartbeat_s: float,
        start_timeout_s: float,
    ) -> None:
        self.fleet = fleet
        self.index = index
        self.log = log
        self.checkpoints = checkpoints
        self.sync = sync
        self.heartbeat_s = heartbeat_s
        self.start_timeout_s = start_timeout_s
        #: re-forming the sync group: a death not noticed yet is noticed within three
        #: heartbeats (and its recovery takes over), so try until a worker's start time passed
        self.regroup_retry = Retry(log, within_s=start_timeout_s, pause_s=lambda _: heartbeat_s)
        self.stopping = False
        self.deaths: list[dict[str, Any]] = []
        self._watches: asyncio.TaskGroup | None = None
        self._generation: dict[str, int] = {}
        #: actor/rollout slots (worker names) that died and whose replacement is not up yet
        self._replacing: set[str] = set()
        #: replaced actor/rollout slots waiting for the sync group to be re-formed: their ready
        #: events, set once it is (by the last recovery of a run of overlapping ones)
        self._unsynced: dict[str, asyncio.Event] = {}
        self.fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[Supervisor]:
        """Watch every worker (and each replacement) while the block runs; on the way out the
        watches, and any recovery under way, are cancelled."""
        async with background("watch") as watches:
            self._watches = watches
            for role, handles in self.fleet.workers.items():
                for i, h in enumerate(handles):
                    self._watch(role, i, h)
            try:
                yield self
            finally:  # a worker stopped from now on is not a death
                self.stopping = True
                self._watches = None

    def _watch(self, role: str, i: int, h: WorkerHandle) -> None:
        if self._watches is not None and not self.stopping:
            self._watches.create_task(self._watch_one(role, i, h), name=f"watch-{h.name}")

    async def _watch_one(self, role: str, i: int, h: WorkerHandle) -> None:
        if h.proc is not None:
            code = await h.proc.wait()
            reason = f"process exited with code {code}"
        else:
            reason = await self._heartbeat(h)
        if self.stopping:
            return
        try:
            await self._recover(role, i, h, reason)
        except Exception as e:  # recovery itself failed: the run must stop, loudly
            self.log.metrics(
                {
                    "event": "recovery_failed",
                    "worker": h.name,
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-2000:],
                }
            )
            if not self.fatal.done():
                self.fatal.set_exception(
                    RuntimeError(f"could not replace {h.name} ({reason}): {type(e).__name__}: {e}")
                )

    async def wait_fatal(self) -> None:
        """Raises once a recovery has failed (run it beside the stage loops)."""
        await self.fatal

    async def _heartbeat(self, h: WorkerHandle) -> str:
        """Probe ``/healthz`` every ``heartbeat_s``; returns why the worker counts as dead.

        A worker restarted at the same URL between two probes answers with another instance
        id: that is a death too (the new process holds none of the old one's data or state).
        The id expected is the one read when the worker was attached (``h.info``), else the
        first answer's."""
        misses = 0
        expected = h.info.get("instance")
        first = True
        while True:
            if not first:
                await asyncio.sleep(self.heartbeat_s)
            first = False
            try:
                out = await h.get("/healthz", timeout=self.heartbeat_s)
            except WorkerError as e:
                misses += 1
                if misses >= 3:
                    return f"no heartbeat 3 times in a row ({e})"
                continue
            misses = 0
            instance = out.get("instance")
            if expected is None:
                expected = instance
            elif instance != expected:
                return f"restarted at its URL (instance {expected} is now {instance})"

    async def _recover(self, role: str, i: int, dead: WorkerHandle, reason: str) -> None:
        ready = self.fleet.pause(dead.name)
        syncs = role in SYNC_ROLES
        if syncs:  # before any await: a recovery finishing meanwhile must see this slot dead
            self._replacing.add(dead.name)
            self._unsynced.pop(dead.name, None)  # died again before its group was re-formed
        lost = self.index.mark_unit_lost(dead.unit)
        event = {
            "event": "worker_died",
            "worker": dead.name,
            "role": role,
            "reason": reason,
            "lost_fields": sum(len(r) for r in lost.values()),
            "time_s": self.log.now(),
        }
        self.deaths.append(event)
        self.log.metrics(event)
        await dead.stop()  # the process is gone; this closes its HTTP session
        gen = self._generation.get(dead.name, 0) + 1
        self._generation[dead.name] = gen
        if dead.proc is not None:
            new = await self.fleet.respawn(role, i, gen)
        else:
            new = await self.fleet.reattach(role, dead, self.start_timeout_s, self.heartbeat_s)
        self.fleet.replace(role, i, new)
        if role in ("actor", "critic"):
            await self.checkpoints.load_trainer(new, role)
        self.log.metrics(
            {
                "event": "worker_replaced",
                "worker": new.name,
                "unit": new.unit,
                "time_s": self.log.now(),
            }
        )
        # watched from now on: should it die while the sync group is re-formed, that recovery
        # takes the group over instead of this one failing
        self._watch(role, i, new)
        if not syncs:
            ready.set()
            return
        self._replacing.discard(dead.name)
        self._unsynced[dead.name] = ready
        await self._resync()

    async def _resync(self) -> None:
        """Re-form the weight-sync group and push the current weights, then let every replaced
        actor/rollout slot resume. Only once no such slot is still being replaced: the group
        takes every handle, and a dead one would fail it (and the run) -- the last recovery of
        overlapping ones does it for all. A failure is retried (a death not noticed yet is
        noticed within three heartbeats, and its recovery then takes over) until
        ``start_timeout_s`` has passed."""

        async def regroup(_: int) -> bool:
            if not self._unsynced or self._replacing:
                return False  # left to the recovery still under way
            await self.sync.regroup()
            return True

        while await self.regroup_retry.call("re-forming the weight-sync group", regroup):
            waiting, self._unsynced = self._unsynced, {}
            for event in waiting.values():
                event.set()
