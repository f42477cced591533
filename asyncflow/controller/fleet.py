"""The run's workers: starting them, which handle serves each slot, calling them, stopping them.

Role ``R`` has the slots ``R0, R1, ...`` (``rollout.workers`` of them spawned here, or one per
URL of ``rollout.urls`` attached). A slot keeps its name; the handle serving it changes when the
supervisor replaces a dead worker (:meth:`Fleet.replace`; a respawned one gets a new storage-unit
name, ``R0.1``, since its data is new). A slot is *ready* unless it is being replaced
(:meth:`Fleet.pause`): whatever serves it waits (:meth:`Fleet.wait_ready`).

Starting (:meth:`Fleet.start`): every worker at once; the first that fails to start fails the
start at once (the others are cancelled: a spawn cancelled mid-start kills its process), and
every worker that did start is registered even when the run is cancelled meanwhile, so that
:meth:`Fleet.stop` stops it. Within :meth:`Fleet.running` -- the whole run -- no worker outlives
``run()``, whether it returns, raises or is cancelled (spawned workers also die with the
controller process itself, see :mod:`asyncflow.controller.pool`).

Storage: the index calls :meth:`Fleet.free` with the rows every task has consumed; their units
are told to drop them, best effort and in the background (a dead worker's rows died with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from pydantic import ValidationError

from asyncflow.config import Config
from asyncflow.controller.concurrency import background, task_group
from asyncflow.controller.placement import place
from asyncflow.controller.pool import (
    WorkerError,
    WorkerHandle,
    attach_worker,
    free_port,
    spawn_worker,
)
from asyncflow.roles.ops import Result
from asyncflow.roles.settings import DistributedSettings, RoleSettings, role_settings
from asyncflow.transfer.index import BatchMeta

R = TypeVar("R", bound=Result)


class Fleet:
    """The workers of one run (``workers``: role -> its slots' handles, when given)."""

    def __init__(self, cfg: Config, workers: dict[str, list[WorkerHandle]] | None = None) -> None:
        self.cfg = cfg
        self.workers: dict[str, list[WorkerHandle]] = workers if workers is not None else {}
        #: storage unit -> URL of every unit rows may be pulled from (a batch names its units)
        self.units = {h.unit: h.url for hs in self.workers.values() for h in hs}
        self._ready: dict[str, asyncio.Event] = {}  # slot name -> set unless being replaced
        self._frees: asyncio.TaskGroup | None = None
        self._settings: dict[str, RoleSettings] = {}
        self._dist_ports: dict[str, int] = {}

    # ------------------------------------------------------------------ slots
    def handle(self, role: str, i: int) -> WorkerHandle:
        """The current worker in slot ``i`` of ``role`` (replaced when it is restarted)."""
        return self.workers[role][i]

    def names(self) -> list[str]:
        return [h.name for hs in self.workers.values() for h in hs]

    def is_ready(self, name: str) -> bool:
        """Whether slot ``name`` is not being replaced."""
        return self._event(name).is_set()

    async def wait_any_ready(self, role: str) -> None:
        """Wait until some slot of ``role`` is not being replaced."""
        if any(self.is_ready(h.name) for h in self.workers[role]):
            return
        some = asyncio.Event()

        async def back(h: WorkerHandle) -> None:
            await self._event(h.name).wait()
            some.set()

        async with background(f"ready-{role}") as tg:
            for h in self.workers[role]:
                tg.create_task(back(h), name=f"ready-{h.name}")
            await some.wait()

    async def wait_ready(self, *handles: WorkerHandle) -> None:
        """Wait until none of these workers' slots is being replaced."""
        for h in handles:
            await self._event(h.name).wait()

    def serving(self, role: str, ranks: list[WorkerHandle]) -> bool:
        """Whether ``ranks`` are still ``role``'s workers, none of them being replaced."""
        return self.workers[role] == ranks and all(self.is_ready(h.name) for h in ranks)

    def pause(self, name: str) -> asyncio.Event:
        """Mark slot ``name`` not ready (its worker died); setting the event resumes it."""
        event = self._ready.setdefault(name, asyncio.Event())
        event.clear()
        return event

    def replace(self, role: str, i: int, new: WorkerHandle) -> None:
        self.workers[role][i] = new
        self.units[new.unit] = new.url

    def _event(self, name: str) -> asyncio.Event:
        if name not in self._ready:
            self._ready[name] = asyncio.Event()
            self._ready[name].set()
        return self._ready[name]

    async def call(
        self,
        worker: WorkerHandle,
        op: str,
        batch: BatchMeta | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/work/{op}`` to ``worker`` with the batch (and where its columns live)."""
        body: dict[str, Any] = {"params": params or {}}
        if batch is not None:
            body["batch"] = batch.to_json()
            body["units"] = {
                u: self.units[u]
                for col in batch.fields.values()
                for u in {f.unit for f in col}
                if u in self.units
            }
        return await worker.call(f"/v1/work/{op}", body, timeout=self.cfg.timeouts.request_s)

    async def op(
        self,
        worker: WorkerHandle,
        result: type[R],
        op: str,
        batch: BatchMeta | None = None,
        params: dict[str, Any] | None = None,
    ) -> R:
        """:meth:`call`, its answer parsed as ``result`` (the op's model in
        :data:`asyncflow.roles.ops.OPS`); an answer that does not fit is the worker's error."""
        out = await self.call(worker, op, batch, params)
        try:
            return result.model_validate(out)
        except ValidationError as e:
            what = f"{op}: an answer that is not a {result.__name__}: {e}"
            raise WorkerError(worker.name, what, 502) from None

    # ------------------------------------------------------------------ processes
    def roles(self) -> dict[str, tuple[int, list[str]]]:
        """Each role of the run: how many workers to spawn, or the URLs to attach."""
        c = self.cfg
        roles = {
            "rollout": (c.rollout.workers, c.rollout.urls),
            "reward": (c.reward.workers, c.reward.urls),
            "actor": (c.actor.workers, c.actor.urls),
        }
        if c.algorithm.kl_coef > 0:
            roles["reference"] = (c.reference.workers, c.reference.urls)
        if c.algorithm.name == "ppo":
            roles["critic"] = (c.critic.workers, c.critic.urls)
        return roles

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Fleet]:
        """The workers' lifetime: storage frees go out in the background meanwhile; on the way
        out, frees still in flight are cancelled and every worker is stopped."""
        try:
            async with background("free") as frees:
                self._frees = frees
                try:
                    yield self
                finally:
                    self._frees = None
        finally:
            await self.stop()

    async def start(self) -> None:
        """Start or attach every worker of the run, registered in slot order."""
        cfg = self.cfg
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._settings = place(cfg, role_settings(cfg), cpus)
        self._dist_ports = {r: free_port(cfg.run.host) for r in ("actor", "critic")}
        token, wait_s = cfg.run.token or "", cfg.timeouts.start_s
        jobs: list[tuple[str, str, Coroutine[Any, Any, WorkerHandle]]] = []
        for role, (n, urls) in self.roles().items():
            if urls:
                jobs += [
                    (role, f"{role}{i}", attach_worker(role, f"{role}{i}", u, token, wait_s))
                    for i, u in enumerate(urls)
                ]
            else:
                jobs += [(role, f"{role}{i}", self.spawn(role, i, 0)) for i in range(n)]
        started: dict[str, WorkerHandle] = {}

        async def start_one(name: str, job: Coroutine[Any, Any, WorkerHandle]) -> None:
            started[name] = await job

        try:
            async with task_group() as tg:
                for _, name, job in jobs:
                    tg.create_task(start_one(name, job), name=f"start-{name}")
        finally:  # also when run() is cancelled meanwhile: stop() stops what did start
            for role, name, _ in jobs:
                if (h := started.get(name)) is not None:
                    self.workers.setdefault(role, []).append(h)
                    self.units[h.unit] = h.url

    async def spawn(self, role: str, i: int, generation: int) -> WorkerHandle:
        """Spawn slot ``i`` of ``role``; a restart (generation > 0) gets a new unit name."""
        n = self.roles()[role][0]
        s = self._settings[role]
        if role in ("actor", "critic") and n > 1:
            rank = DistributedSettings(
                rank=i,
                world_size=n,
                master_addr=self.cfg.run.host,
                master_port=self._dist_ports[role],
            )
            s = s.model_copy(update={"distributed": rank})
        name = f"{role}{i}"
        return await spawn_worker(
            role,
            name,
            self.cfg.run.token or "",
            s,
            host=self.cfg.run.host,
            log_dir=self.cfg.run_dir / "logs",
            start_timeout=self.cfg.timeouts.start_s,
            unit=name if generation == 0 else f"{name}.{generation}",
        )

    async def respawn(self, role: str, i: int, generation: int) -> WorkerHandle:
        """A dead spawned worker's replacement (data-parallel trainer ranks cannot have one)."""
        if role in ("actor", "critic") and self.roles()[role][0] > 1:
            raise RuntimeError(
                f"{role}{i} died: data-parallel trainer ranks cannot be replaced "
                "one at a time (their process group died with it)"
            )
        return await self.spawn(role, i, generation)

    async def reattach(
        self, role: str, dead: WorkerHandle, timeout_s: float, pause_s: float
    ) -> WorkerHandle:
        """A dead attached worker, once its own process manager has restarted it at its URL
        (waited for up to ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    h = await attach_worker(role, dead.name, dead.url, dead.token)
                except WorkerError:
                    await asyncio.sleep(pause_s)
                    continue
                # the id its heartbeats must keep answering with (else the first one's)
                with contextlib.suppress(WorkerError, KeyError):
                    h.info["instance"] = (await h.get("/healthz"))["instance"]
                return h

    async def stop(self) -> None:
        """Stop every worker (an attached one is only disconnected), whatever the others do."""
        handles = [h for hs in self.workers.values() for h in hs]
        await asyncio.gather(*(h.stop() for h in handles), return_exceptions=True)

    def free(self, by_unit: dict[str, list[int]]) -> None:
        """Index callback: rows every task consumed; tell their storage units to drop them."""
        if self._frees is None:
            return  # not running: no worker holds them
        for unit, rows in by_unit.items():
            handle = next((h for hs in self.workers.values() for h in hs if h.unit == unit), None)
            if handle is None:
                continue  # "dataset": prompts live in the dataset, nothing to free
            self._frees.create_task(self._free(handle, rows), name=f"free-{handle.name}")

    async def _free(self, handle: WorkerHandle, rows: list[int]) -> None:
        # best effort: a dead worker's rows died with it (its unit is marked lost)
        with contextlib.suppress(Exception):
            await handle.call("/v1/storage/free", {"rows": rows}, timeout=60)
