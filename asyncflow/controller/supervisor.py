"""Worker supervision: notice a dead worker within seconds, lose nothing, carry on.

For every worker the supervisor runs one watch task: a spawned worker is watched through its
process (its exit is noticed at once), an attached one through ``/healthz`` heartbeats -- three
missed in a row, or an answer with another ``instance`` id (the worker was restarted at the same
URL between two probes: same unit name, but empty storage, initial weights, no sync group) is a
death. When a worker dies:

1. its slot is marked not ready (stage loops for it pause; requests in flight fail and give their
   rows back to the index);
2. its storage unit is marked lost in the index, so every field it held -- and everything derived
   from those fields -- is recomputed from the prompts (lineage);
3. it is replaced: a spawned worker is restarted with a new storage-unit name; an attached one is
   waited for at its URL (its orchestrator restarts it);
4. state is restored: a trainer loads the checkpoint of the version it had reached (the actor
   from ``step_N/``, the PPO critic from ``step_N/critic/``; so keep ``checkpoint.every=1``
   where trainer faults must be survived), and the weight-sync group is formed anew with every
   rollout engine, which then receives the current weights. The group must hold every actor and
   rollout slot: while another of those slots is still being replaced (two died at once), the
   group is left to the last of those recoveries, which re-forms it once for all of them;
5. the slot is marked ready and the loops resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from asyncflow.controller.pool import WorkerError, WorkerHandle, attach_worker
from asyncflow.controller.stages import Pipeline

Spawn = Callable[[str, int, int], Awaitable[WorkerHandle]]  # role, slot, generation
InitSync = Callable[[], Awaitable[None]]

#: the roles in the weight-sync group
SYNC_ROLES = ("actor", "rollout")


class Supervisor:
    #: where a step's checkpoint keeps the PPO critic (the actor's is the step's folder itself)
    CRITIC_SUBDIR = "critic"

    def __init__(
        self,
        pipeline: Pipeline,
        spawn: Spawn,
        init_sync: InitSync,
        checkpoints: Path,
        heartbeat_s: float,
        start_timeout_s: float,
    ) -> None:
        self.p = pipeline
        self.spawn = spawn
        self.init_sync = init_sync
        self.checkpoints = checkpoints
        self.heartbeat_s = heartbeat_s
        self.start_timeout_s = start_timeout_s
        self.stopping = False
        self.deaths: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation: dict[str, int] = {}
        #: actor/rollout slots (worker names) that died and whose replacement is not up yet
        self._replacing: set[str] = set()
        #: replaced actor/rollout slots waiting for the sync group to be re-formed: their ready
        #: events, set once it is (by the last recovery of a run of overlapping ones)
        self._unsynced: dict[str, asyncio.Event] = {}
        self.fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def watch_all(self) -> None:
        for role, handles in self.p.workers.items():
            for i, h in enumerate(handles):
                self._watch(role, i, h)

    def _watch(self, role: str, i: int, h: WorkerHandle) -> None:
        task = asyncio.create_task(self._watch_one(role, i, h), name=f"watch-{h.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self.stopping = True
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

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
            self.p.log.metrics(
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
        p = self.p
        ready = p.ready.setdefault(dead.name, asyncio.Event())
        ready.clear()
        syncs = role in SYNC_ROLES
        if syncs:  # before any await: a recovery finishing meanwhile must see this slot dead
            self._replacing.add(dead.name)
            self._unsynced.pop(dead.name, None)  # died again before its group was re-formed
        lost = p.index.mark_unit_lost(dead.unit)
        event = {
            "event": "worker_died",
            "worker": dead.name,
            "role": role,
            "reason": reason,
            "lost_fields": sum(len(r) for r in lost.values()),
            "time_s": p.log.now(),
        }
        self.deaths.append(event)
        p.log.metrics(event)
        await dead.stop()  # the process is gone; this closes its HTTP session
        gen = self._generation.get(dead.name, 0) + 1
        self._generation[dead.name] = gen
        if dead.proc is not None:
            new = await self.spawn(role, i, gen)
        else:
            new = await self._reattach(role, dead)
        p.workers[role][i] = new
        p.units[new.unit] = new.url
        if role in ("actor", "critic"):
            await self._restore_trainer(new, role)
        p.log.metrics(
            {
                "event": "worker_replaced",
                "worker": new.name,
                "unit": new.unit,
                "time_s": p.log.now(),
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
        p = self.p
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        while self._unsynced and not self._replacing:
            try:
                async with p.sync_lock:
                    await self.init_sync()
                    await self._push_weights()
            except WorkerError as e:
                if loop.time() > deadline:
                    raise
                p.log.metrics(
                    {
                        "event": "retry",
                        "what": "re-forming the weight-sync group",
                        "error": str(e)[:300],
                        "time_s": p.log.now(),
                    }
                )
                await asyncio.sleep(self.heartbeat_s)
                continue
            waiting, self._unsynced = self._unsynced, {}
            for event in waiting.values():
                event.set()

    async def _reattach(self, role: str, dead: WorkerHandle) -> WorkerHandle:
        async with asyncio.timeout(self.start_timeout_s):
            while True:
                try:
                    h = await attach_worker(role, dead.name, dead.url, dead.token)
                except WorkerError:
                    await asyncio.sleep(self.heartbeat_s)
                    continue
                # the id its heartbeats must keep answering with (else the first one's)
                with contextlib.suppress(WorkerError, KeyError):
                    h.info["instance"] = (await h.get("/healthz"))["instance"]
                return h

    async def _restore_trainer(self, new: WorkerHandle, role: str = "actor") -> None:
        """Load the checkpoint of the version training had reached (its last committed step,
        possibly one ahead of what the rollout engines serve): the actor's is the step's
        folder, the critic's its ``critic/`` sub-folder; without one, fail."""
        version = self.p.trained_version
        path = self.checkpoints / f"step_{version:06d}"
        if role == "critic":
            path = path / self.CRITIC_SUBDIR
        if version == 0:
            return  # nothing trained yet: the fresh worker's initial weights are right
        if not (path / "trainer_state.json").exists():
            raise RuntimeError(
                f"{new.name} died at policy version {version} and there is no {role} "
                f"checkpoint at {path}; set checkpoint.every=1 to survive trainer failures"
            )
        await self.p.call(new, "load", params={"path": str(path)})

    async def _push_weights(self) -> None:
        """Send the actor's current weights to every rollout engine (a new one has none)."""
        p = self.p
        actor = p.workers["actor"][0]
        info = await actor.get("/v1/info")
        version = int(info.get("policy_version", p.version))
        await asyncio.gather(
            p.call(actor, "sync_send"), *(p.call(w, "sync_recv") for w in p.workers["rollout"])
        )
        p.log.metrics({"event": "weights_pushed", "version": version, "time_s": p.log.now()})
