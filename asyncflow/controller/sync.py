"""The weights' way from the actor to the rollout engines, and the policy versions it moves.

The actor's rank 0 and every rollout engine form one torch.distributed group
(:meth:`WeightSync.init_group`, at start; the supervisor re-forms it after replacing one of them:
:meth:`WeightSync.regroup`, which then pushes the current weights to every engine -- a new one
has none). After each optimizer step the step driver runs :meth:`WeightSync.run`: one broadcast,
after which the engines serve the new version, which is what admits later steps
(:class:`Versions`, waited on by admission). A sync and a re-forming of the group never
interleave (one lock), and a sync cut off by a dying worker is retried once it is replaced.

The sync after step s runs in the background while step s + 1 trains (its rows were generated
by version >= s - k + 1, so they never wait for it). The actor refuses to step its optimizer
while a send reads the weights, so the weights sent are exactly version s + 1 -- or newer, when
the sync was held up (a worker being replaced) while step s + 1 trained; those are as good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, cast
from urllib.parse import urlsplit

from asyncflow.config import Config
from asyncflow.controller.concurrency import all_of
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.pool import free_port
from asyncflow.controller.retry import Retry
from asyncflow.roles.ops import OkResult, SyncRecvResult, SyncSendResult
from asyncflow.runlog import RunLog, Span


def sync_backend(setting: str, devices: list[str]) -> str:
    """The torch.distributed backend of the weight sync: ``sync.backend`` as set, or for "auto"
    NCCL when every end of the broadcast (the actor's rank 0, each rollout engine) reports a
    CUDA device, gloo otherwise (NCCL cannot move CPU tensors)."""
    if setting != "auto":
        return setting
    on_gpu = bool(devices) and all(d.startswith("cuda") for d in devices)
    return "nccl" if on_gpu else "gloo"


class Versions:
    """The policy versions of a run: ``served`` by every rollout engine (step s is admitted
    once it reaches s - k) and ``trained``, the actor's after its last committed step -- ahead
    of ``served`` while that step's sync runs; a replaced trainer restores this one."""

    def __init__(self, version: int = 0) -> None:
        self.served = version
        self.trained = version
        self._changed = asyncio.Condition()

    def restore(self, version: int) -> None:
        """A resumed run: the checkpoint's version is both trained and (once synced) served."""
        self.served = self.trained = version

    async def serve(self, version: int) -> None:
        async with self._changed:
            self.served = version
            self._changed.notify_all()

    async def wait_served(self, version: int) -> None:
        """Until the rollout engines serve ``version`` or newer (versions only grow)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.served >= version)


class WeightSync:
    """Broadcasts the actor's weights to the rollout engines (see the module's docstring)."""

    def __init__(
        self, cfg: Config, fleet: Fleet, versions: Versions, log: RunLog, retry: Retry
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.versions = versions
        self.log = log
        self.retry = retry
        self.lock = asyncio.Lock()  # a sync and a re-formed sync group never interleave

    async def init_group(self) -> None:
        """Form the group: the actor's rank 0 (rank 0 of the group) and every rollout engine."""
        fleet, sync = self.fleet, self.cfg.sync
        rollouts = fleet.workers["rollout"]
        actor = fleet.workers["actor"][0]
        devices: list[str] = []
        if sync.backend == "auto":  # the devices decide: ask every end of the broadcast
            infos = await all_of((f"info-{h.name}", h.get("/v1/info")) for h in [actor, *rollouts])
            devices = [str(i.get("device", "cpu")) for i in infos]
        backend = sync_backend(sync.backend, devices)
        # The actor's rank 0 hosts the rendezvous: use the address we reach it at. (A port
        # free here may not be free there: multi-host runs set sync.port.)
        host = urlsplit(actor.url).hostname or self.cfg.run.host
        port = sync.port or free_port(self.cfg.run.host)
        params = {
            "host": host,
            "port": port,
            "world_size": 1 + len(rollouts),
            "backend": backend,
            "timeout_s": sync.timeout_s,
            "bucket_mb": sync.bucket_mb,
        }
        ranks = [(actor, params)]
        ranks += [(w, {**params, "rank": i + 1}) for i, w in enumerate(rollouts)]
        calls = [
            (f"sync-init-{w.name}", fleet.op(w, OkResult, "sync_init", params=p)) for w, p in ranks
        ]
        await all_of(calls)

    async def regroup(self) -> None:
        """Form the group anew (a member was replaced) and push the current weights."""
        async with self.lock:
            await self.init_group()
            await self.push()

    async def push(self) -> None:
        """Send the actor's current weights to every rollout engine (a new one has none)."""
        actor = self.fleet.workers["actor"][0]
        info = await actor.get("/v1/info")
        version = int(info.get("policy_version", self.versions.served))
        await self._send_and_receive()
        self.log.metrics({"event": "weights_pushed", "version": version, "time_s": self.log.now()})

    async def run(self, version: int) -> dict[str, Any]:
        """Broadcast the actor's weights to every rollout engine; they then serve ``version``
        (or newer). Retried, after the supervisor replaced a dead worker, like any stage.
        Returns the timings of the step record's ``sync_*`` keys."""

        async def attempt(_: int) -> dict[str, Any]:
            workers = self.fleet.workers
            await self.fleet.wait_ready(*workers["actor"], *workers["rollout"])
            async with self.lock:
                return await self._broadcast(version)

        return await self.retry.call(f"weight sync to version {version}", attempt)

    async def _send_and_receive(self) -> tuple[SyncSendResult, list[SyncRecvResult]]:
        """One broadcast: the actor's send and every engine's receive, with their answers."""
        actor, rollouts = self.fleet.workers["actor"][0], self.fleet.workers["rollout"]
        send = self.fleet.op(actor, SyncSendResult, "sync_send")
        calls: list[tuple[str, Coroutine[Any, Any, SyncSendResult | SyncRecvResult]]]
        calls = [(f"sync-send-{actor.name}", send)]
        calls += [
            (f"sync-recv-{w.name}", self.fleet.op(w, SyncRecvResult, "sync_recv")) for w in rollouts
        ]
        sent, *received = await all_of(calls)
        return cast(SyncSendResult, sent), cast(list[SyncRecvResult], received)

    async def _broadcast(self, version: int) -> dict[str, Any]:
        actor, rollouts = self.fleet.workers["actor"][0], self.fleet.workers["rollout"]
        start = self.log.now()
        out, received = await self._send_and_receive()
        end = self.log.now()
        for w in [actor, *rollouts]:
            self.log.span(Span(w.name, "sync", start, end, 0, version))
        # The actor sends the weights it has now: newer than ``version`` when this sync was
        # held up (a worker being replaced) while the next step trained. Those are as good.
        sent = out.version
        served = {o.metrics.version for o in received}
        if sent < version or served != {sent}:
            raise RuntimeError(
                f"weight sync: the actor sent version {sent} and the rollout engines report "
                f"{sorted(served)}; expected version {version} or newer everywhere"
            )
        await self.versions.serve(max(self.versions.served, sent))
        recv = [o.metrics for o in received]
        return {
            "sync_s": end - start,
            "bytes": out.metrics.bytes,
            "send_s": out.metrics.seconds,
            "recv_s": max(m.recv_s for m in recv),
            "reload_s": max(m.total_s - m.recv_s for m in recv),
        }
