"""Weight sync from the trainer to rollout engines over a standalone torch.distributed group.

Owns the channel that carries new policy weights: one sender (the trainer's rank 0, group rank
0) broadcasts to N receivers (rollout workers, group ranks 1..N). The group is built directly
from a ``TCPStore`` plus ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (CUDA), never through
``init_process_group``: the trainer may already use the default group for DDP/FSDP, and the
rollout worker has no default group at all.

Wire format of one update (every message is a broadcast from rank 0):

1. the manifest length (one int64), then the manifest: UTF-8 JSON with the policy ``version``
   and, per bucket, its dtype, element count and entries ``[name, shape, offset]``;
2. one flat buffer per bucket: tensors of one dtype concatenated, at most ``bucket_bytes``
   (a larger tensor travels alone).

Buckets are pipelined: up to ``inflight`` broadcasts are posted at once, so packing (sender) and
loading (receiver) overlap the transfer. The receiver's :class:`WeightUpdate` yields
``(name, tensor)`` views of its bucket buffers, lazily, which is exactly what an engine's
``load_weights`` consumes (it copies them into the model). Bucket buffers are kept and reused by
the next update of the same layout, on both ends: allocating and first-touching them every time
cost as much as the transfer. So a received tensor is valid until the next ``receive()``; clone
it to keep it longer. Every wait carries the group timeout: a missing peer raises
(``RuntimeError`` / ``TimeoutError`` from torch.distributed) instead of hanging. All calls block;
async callers use the ``a*`` wrappers, which run them in a thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_PREFIX = "asyncflow/weights"


def open_group(
    host: str, port: int, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 60.0
) -> Any:
    """Rendezvous at ``host:port`` (rank 0 hosts the store) and build a standalone group.

    Returns the backend object itself (``ProcessGroupGloo`` / ``ProcessGroupNCCL``), which has
    the collective methods (``broadcast(tensors, options) -> Work``).
    """
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
    )
    prefixed = dist.PrefixStore(_PREFIX, store)
    if backend == "gloo":
        if os.environ.get("GLOO_SOCKET_IFNAME"):
            return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        # Bind gloo to the local address that routes to the rendezvous host: by default it
        # resolves this machine's hostname, which is often a loopback address, and peers on
        # other hosts (or network namespaces) then cannot connect back.
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=_route_to(host, port))]
        return dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
    if backend == "nccl":
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None:
            raise ValueError("backend 'nccl' needs a CUDA build of torch")
        options = nccl.Options()
        options._timeout = timeout
        return nccl(prefixed, rank, world_size, options)
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


def _route_to(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        addr: str = s.getsockname()[0]
        return addr


@dataclass(frozen=True, slots=True)
class SyncStats:
    """What one :meth:`WeightSender.send` moved and how long it took."""

    version: int
    num_tensors: int
    num_buckets: int
    bytes: int
    seconds: float


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype in manifest: {name!r}")
    return dtype


@dataclass(slots=True)
class Bucket:
    """One flat buffer of a single dtype: entries are ``(name, shape, offset)`` in elements."""

    dtype: str
    numel: int = 0
    entries: list[tuple[str, list[int], int]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"dtype": self.dtype, "numel": self.numel, "entries": self.entries}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Bucket:
        entries = [(str(n), [int(d) for d in shape], int(o)) for n, shape, o in data["entries"]]
        return cls(str(data["dtype"]), int(data["numel"]), entries)

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.numel, dtype=_dtype(self.dtype), device=device)


class _BufferPool:
    """Bucket buffers kept from one update to the next (same layout: no allocation and no
    first-touch page faults, which otherwise cost as much as the transfer itself)."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def get(self, index: int, bucket: Bucket, device: torch.device) -> torch.Tensor:
        buffer = self._buffers.get(index)
        if buffer is None or buffer.dtype != _dtype(bucket.dtype) or buffer.numel() != bucket.numel:
            buffer = self._buffers[index] = bucket.empty(device)
        return buffer


def plan_buckets(
    tensors: list[tuple[str, torch.Tensor]], bucket_bytes: int, direct_bytes: int | None = None
) -> list[Bucket]:
    """Group tensors per dtype into buckets of at most ``bucket_bytes``; a tensor larger than
    that, or of at least ``direct_bytes``, gets a bucket of its own (sent without packing)."""
    open_buckets: dict[torch.dtype, Bucket] = {}
    buckets: list[Bucket] = []
    for name, tensor in tensors:
        numel = tensor.numel()
        if direct_bytes is not None and numel * tensor.element_size() >= direct_bytes:
            buckets.append(Bucket(str(tensor.dtype), numel, [(name, list(tensor.shape), 0)]))
            continue
        bucket = open_buckets.get(tensor.dtype)
        if bucket is not None and (bucket.numel + numel) * tensor.element_size() > bucket_bytes:
            buckets.append(open_buckets.pop(tensor.dtype))
            bucket = None
        if bucket is None:
            bucket = open_buckets[tensor.dtype] = Bucket(str(tensor.dtype))
        bucket.entries.append((name, list(tensor.shape), bucket.numel))
        bucket.numel += numel
    buckets.extend(open_buckets.values())
    return buckets


class _Channel:
    """A standalone group plus the broadcast primitive both ends share."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        device: str | None,
    ) -> None:
        if world_size < 2:
            raise ValueError("world_size must count the sender and at least one receiver")
        self._args = (host, port, rank, world_size, backend, timeout_s)
        self.timeout = timedelta(seconds=timeout_s)
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self._group: Any = None

    def connect(self) -> None:
        """Join the group (blocks until every member has joined, or raises after the timeout)."""
        if self._group is None:
            self._group = open_group(*self._args)

    def post(self, tensor: torch.Tensor) -> dist.Work:
        """Start a broadcast from rank 0 of ``tensor`` (in place on receivers)."""
        if self._group is None:
            raise RuntimeError("not connected (call connect() first)")
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.timeout = self.timeout
        return self._group.broadcast([tensor], options)

    def wait(self, work: dist.Work) -> None:
        if not work.wait(self.timeout):
            raise TimeoutError(f"weight broadcast did not finish within {self.timeout}")

    def broadcast(self, tensor: torch.Tensor) -> None:
        """One raw blocking broadcast from rank 0 (baselines, control messages)."""
        self.wait(self.post(tensor))

    def close(self) -> None:
        self._group = None


class WeightSender:
    """Rank 0 of the weight-sync group: broadcasts named tensors to every receiver."""

    def __init__(
        self,
        host: str,
        port: int,
        world_size: int,
        *,
        backend: str = "gloo",
        bucket_bytes: int = 128 << 20,
        direct_bytes: int | None = 1 << 20,
        inflight: int = 2,
        timeout_s: float = 60.0,
        device: str | None = None,
    ) -> None:
        """``world_size`` = 1 + number of receivers. Tensors of at least ``direct_bytes`` are
        broadcast as they are (no packing copy; None packs everything that fits a bucket).
        ``device`` holds the buckets (default: CUDA for NCCL, CPU for gloo)."""
        self._channel = _Channel(host, port, 0, world_size, backend, timeout_s, device)
        self._bucket_bytes = bucket_bytes
        self._direct_bytes = direct_bytes
        self._inflight = max(1, inflight)
        self._pool = _BufferPool()

    def connect(self) -> None:
        """Host the rendezvous and wait for every receiver to join."""
        self._channel.connect()

    async def aconnect(self) -> None:
        await asyncio.to_thread(self.connect)

    @torch.no_grad()
    def send(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """Broadcast one update (blocking); returns when every bucket has been sent."""
        start = time.perf_counter()
        tensors = [(name, t.detach()) for name, t in weights]
        by_name = dict(tensors)
        buckets = plan_buckets(tensors, self._bucket_bytes, self._direct_bytes)
        body = {"version": version, "buckets": [b.to_json() for b in buckets]}
        manifest = json.dumps(body).encode()
        self._send_bytes(manifest)
        pending: list[dist.Work] = []
        total = 0
        for index, bucket in enumerate(buckets):
            buffer = self._pack(index, bucket, by_name)
            total += buffer.numel() * buffer.element_size()
            pending.append(self._channel.post(buffer))
            if len(pending) >= self._inflight:
                self._channel.wait(pending.pop(0))
        for work in pending:
            self._channel.wait(work)
        seconds = time.perf_counter() - start
        return SyncStats(version, len(tensors), len(buckets), total, seconds)

    async def asend(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        return await asyncio.to_thread(self.send, weights, version)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """A raw broadcast of ``tensor`` to every receiver (e.g. a bandwidth baseline)."""
        self._channel.broadcast(tensor)

    def _send_bytes(self, payload: bytes) -> None:
        device = self._channel.device
        self._channel.wait(self._channel.post(torch.tensor([len(payload)], device=device)))
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        self._channel.wait(self._channel.post(data))

    def _pack(self, index: int, bucket: Bucket, by_name: dict[str, torch.Tensor]) -> torch.Tensor:
        if len(bucket.entries) == 1:  # a lone tensor travels as it is, without a copy
            tensor = by_name[bucket.entries[0][0]].to(self._channel.device)
            if tensor.is_contiguous():
                return tensor.reshape(-1)
        buffer = self._pool.get(index, bucket, self._channel.device)
        for name, _shape, offset in bucket.entries:
            tensor = by_name[name]
            buffer[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
        return buffer

    def close(self) -> None:
        self._channel.close()


class WeightUpdate:
    """One incoming update: its ``version`` and a one-shot iterator of ``(name, tensor)``.

    The tensors are views into bucket buffers that the next ``receive()`` overwrites."""

    def __init__(
        self, channel: _Channel, manifest: dict[str, Any], inflight: int, pool: _BufferPool
    ) -> None:
        self.version = int(manifest["version"])
        self._buckets = [Bucket.from_json(b) for b in manifest["buckets"]]
        self._channel = channel
        self._inflight = max(1, inflight)
        self._pool = pool
        self._iterator = self._receive()
        self.bytes = 0
        self.done = False

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._iterator

    def drain(self) -> None:
        """Receive whatever the consumer left unread, keeping the group in step."""
        for _ in self._iterator:
            pass

    def _receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        posted: list[tuple[dist.Work, torch.Tensor, Bucket]] = []
        upcoming = iter(enumerate(self._buckets))
        for index, bucket in upcoming:
            posted.append(self._post(index, bucket))
            if len(posted) >= self._inflight:
                break
        while posted:
            work, buffer, bucket = posted.pop(0)
            self._channel.wait(work)
            following = next(upcoming, None)
            if following is not None:
                posted.append(self._post(*following))
            self.bytes += buffer.numel() * buffer.element_size()
            for name, shape, offset in bucket.entries:
                numel = int(torch.Size(shape).numel())
                yield name, buffer[offset : offset + numel].view(shape)
        self.done = True

    def _post(self, index: int, bucket: Bucket) -> tuple[dist.Work, torch.Tensor, Bucket]:
        buffer = self._pool.get(index, bucket, self._channel.device)
        return self._channel.post(buffer), buffer, bucket


class WeightReceiver:
    """Group rank ``rank`` (1..N): receives updates from the trainer's sender."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        *,
        backend: str = "gloo",
        inflight: int = 2,
        timeout_s: float = 60.0,
        device: str | None = None,
    ) -> None:
        if not 1 <= rank < world_size:
            raise ValueError(f"receiver rank must be in 1..{world_size - 1}, got {rank}")
        self._channel = _Channel(host, port, rank, world_size, backend, timeout_s, device)
        self._inflight = inflight
        self._pool = _BufferPool()
        self._last: WeightUpdate | None = None

    def connect(self) -> None:
        """Join the sender's rendezvous (raises after the timeout if it is not there)."""
        self._channel.connect()

    async def aconnect(self) -> None:
        await asyncio.to_thread(self.connect)

    def receive(self) -> WeightUpdate:
        """Block until the next update's manifest arrives; its tensors then stream lazily.

        Iterate the returned update completely (or call ``drain()``) before the next
        ``receive``; an unfinished previous update is drained here to keep the group in step.
        """
        if self._last is not None and not self._last.done:
            self._last.drain()
        length = torch.zeros(1, dtype=torch.int64, device=self._channel.device)
        self._channel.wait(self._channel.post(length))
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=self._channel.device)
        self._channel.wait(self._channel.post(data))
        manifest = json.loads(bytes(data.cpu().numpy()).decode())
        self._last = WeightUpdate(self._channel, manifest, self._inflight, self._pool)
        return self._last

    async def areceive(self) -> WeightUpdate:
        """:meth:`receive` off the event loop."""
        return await asyncio.to_thread(self.receive)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Receive a raw broadcast into ``tensor`` (the sender's :meth:`WeightSender.broadcast`)."""
        self._channel.broadcast(tensor)

    def close(self) -> None:
        self._channel.close()


__all__ = [
    "Bucket",
    "SyncStats",
    "WeightReceiver",
    "WeightSender",
    "WeightUpdate",
    "open_group",
    "plan_buckets",
]
