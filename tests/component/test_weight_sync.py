"""Weight sync over a standalone gloo group: buckets, 1 sender -> 2 receiver processes, timeouts."""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asyncflow.engines.weight_sync import WeightReceiver, WeightSender, plan_buckets


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(300, 64, generator=gen),
        "layers.0.q.weight": torch.randn(64, 64, generator=gen),
        "layers.0.norm.weight": torch.randn(64, generator=gen).to(torch.bfloat16),
        "layers.0.mlp.weight": torch.randn(128, 64, generator=gen),
        "step": torch.tensor([7], dtype=torch.int64),
        "scalar": torch.tensor(3.5),
    }


def _receive_to_file(port: int, rank: int, out: str) -> None:
    receiver = WeightReceiver("127.0.0.1", port, rank, 3, timeout_s=60)
    receiver.connect()
    for _ in range(2):  # two updates back to back
        update = receiver.receive()
        received = {name: tensor.clone() for name, tensor in update}
        received["__version__"] = torch.tensor([update.version])
    save_file(received, out)


def test_plan_buckets_groups_per_dtype_and_bounds_size() -> None:
    weights = list(make_weights().items())
    buckets = plan_buckets(weights, bucket_bytes=64 * 64 * 4)
    assert sorted(n for b in buckets for n, _, _ in b.entries) == sorted(n for n, _ in weights)
    for bucket in buckets:
        itemsize = torch.empty(0, dtype=getattr(torch, bucket.dtype[6:])).element_size()
        assert bucket.numel * itemsize <= 64 * 64 * 4 or len(bucket.entries) == 1
    assert len({b.dtype for b in buckets}) == 3


def test_one_sender_two_receivers_bit_identical(tmp_path: Path) -> None:
    port = free_port()
    ctx = mp.get_context("spawn")
    outs = [str(tmp_path / f"r{rank}.safetensors") for rank in (1, 2)]
    procs = [
        ctx.Process(target=_receive_to_file, args=(port, rank, out))
        for rank, out in zip((1, 2), outs)
    ]
    for proc in procs:
        proc.start()
    sender = WeightSender("127.0.0.1", port, 3, bucket_bytes=20_000, timeout_s=60)
    sender.connect()
    weights = make_weights()
    first = sender.send({k: v * 0 for k, v in weights.items()}.items(), version=1)
    stats = sender.send(weights.items(), version=2)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert first.version == 1 and stats.num_buckets > 3
    assert stats.bytes == sum(t.numel() * t.element_size() for t in weights.values())
    for out in outs:
        received = load_file(out)
        assert int(received.pop("__version__")) == 2
        assert received.keys() == weights.keys()
        for name, tensor in weights.items():
            assert received[name].dtype == tensor.dtype and received[name].shape == tensor.shape
            assert torch.equal(received[name], tensor), name
    sender.close()


def test_receive_times_out_when_sender_sends_nothing() -> None:
    port = free_port()
    sender = WeightSender("127.0.0.1", port, 2, timeout_s=3)
    receiver = WeightReceiver("127.0.0.1", port, 1, 2, timeout_s=3)
    joined = threading.Thread(target=sender.connect)
    joined.start()
    receiver.connect()
    joined.join()
    start = time.monotonic()
    with pytest.raises((RuntimeError, TimeoutError)):
        receiver.receive()
    assert time.monotonic() - start < 30


def test_connect_times_out_without_sender() -> None:
    receiver = WeightReceiver("127.0.0.1", free_port(), 1, 2, timeout_s=2)
    start = time.monotonic()
    with pytest.raises((RuntimeError, TimeoutError)):
        receiver.connect()
    assert time.monotonic() - start < 30
