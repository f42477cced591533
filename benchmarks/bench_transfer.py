"""Data-plane benchmark: put, get-metadata and get-data on TransferQueue's natural workload.

Workload: batches of 256 rows of ``input_ids`` int64 [512], ``attention_mask`` int64 [512],
``old_log_probs`` float32 [512] and a scalar ``reward`` (2.6 MB), two storage-unit worker
processes on loopback, put then get. Prints median latency and MB/s for put, get-metadata and
get-data; get-metadata latency with 1k, 64k and 1M rows resident; get-data MB/s for a large
batch; and an unrelated put's latency while a consumer waits for rows that never come.

If TransferQueue runs (``--tq-python PATH`` naming a Python that has the ``transferqueue`` package,
default: this one), the same workload runs on it in the same run and the ratios are printed.

    python benchmarks/bench_transfer.py [--iters 30] [--tq-python .venv-tq/bin/python]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from asyncflow.controller.pool import MALLOC_TUNABLES, WorkerHandle, spawn_worker
from asyncflow.transfer.client import TransferClient
from asyncflow.transfer.index import SampleIndex

COLS = ("input_ids", "attention_mask", "old_log_probs", "reward")
TOKEN = secrets.token_hex(8)


def make_batch(n: int, seq: int = 512) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, 50_000, (n, seq), dtype=torch.int64),
        "attention_mask": torch.ones(n, seq, dtype=torch.int64),
        "old_log_probs": torch.randn(n, seq),
        "reward": torch.randn(n),
    }


def nbytes(batch: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in batch.values())


def new_index() -> SampleIndex:
    idx = SampleIndex()
    idx.register_task("train", list(COLS))
    return idx


async def put(
    client: TransferClient,
    idx: SampleIndex,
    units: list[WorkerHandle],
    batch: dict[str, torch.Tensor],
) -> list[int]:
    """Register rows, put half on each unit concurrently, mark them ready."""
    n = len(batch["reward"])
    rows = idx.add_rows([{}] * n)
    halves = [(units[k], rows[k::2], {c: t[k::2] for c, t in batch.items()}) for k in range(2)]
    shapes = await asyncio.gather(*(client.put(u.unit, r, b) for u, r, b in halves))
    for (u, r, _), sh in zip(halves, shapes):
        for c in COLS:
            idx.mark_ready(r, c, u.unit, shapes=sh[c], dtype=str(batch[c].dtype)[6:])
    return rows


def ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


async def workload(units: list[WorkerHandle], iters: int) -> dict[str, float]:
    idx = new_index()
    batch = make_batch(256)
    size = nbytes(batch)
    t_put, t_meta, t_data = [], [], []
    async with TransferClient({u.unit: u.url for u in units}, TOKEN) as client:
        for _ in range(3):  # warm-up
            await put(client, idx, units, batch)
            m = await idx.get_batch("train", 256)
            await client.fetch(m)
            idx.ack("train", m.rows)
        for _ in range(iters):
            t0 = time.perf_counter()
            await put(client, idx, units, batch)
            t1 = time.perf_counter()
            meta = await idx.get_batch("train", 256)
            t2 = time.perf_counter()
            cols = await client.fetch(meta)
            t3 = time.perf_counter()
            assert cols["input_ids"].stacked().shape == (256, 512)
            idx.ack("train", meta.rows)
            await asyncio.gather(*(client.free(u.unit, meta.rows) for u in units))
            t_put.append(t1 - t0)
            t_meta.append(t2 - t1)
            t_data.append(t3 - t2)
    mb = size / 1e6
    return {
        "batch_MB": mb,
        "put_ms": ms(t_put),
        "put_MBps": mb / (ms(t_put) / 1e3),
        "get_meta_ms": ms(t_meta),
        "get_data_ms": ms(t_data),
        "get_data_MBps": mb / (ms(t_data) / 1e3),
    }


def meta_latency_resident(resident: int, reps: int = 200) -> dict[str, float]:
    """get_batch latency (1 row and 256 rows) with ``resident`` rows ready in the index."""
    idx = new_index()
    for _ in range(max(1, resident // 1000)):
        rows = idx.add_group(min(1000, resident))
        for c in COLS:
            idx.mark_ready(rows, c, "u0", shapes=[512] if c != "reward" else [])
    out = {}
    for n in (1, 256):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            m = idx.try_get_batch("train", n)
            ts.append(time.perf_counter() - t0)
            assert m is not None
            idx.requeue("train", m.rows)
        out[f"get_meta_{n}_ms"] = ms(ts)
    return out


async def large_batch(units: list[WorkerHandle], rows: int, reps: int = 5) -> float:
    idx = new_index()
    batch = make_batch(rows)
    ts = []
    async with TransferClient({u.unit: u.url for u in units}, TOKEN) as client:
        for _ in range(reps):
            await put(client, idx, units, batch)
            meta = await idx.get_batch("train", rows)
            t0 = time.perf_counter()
            await client.fetch(meta)
            ts.append(time.perf_counter() - t0)
            idx.ack("train", meta.rows)
            await asyncio.gather(*(client.free(u.unit, meta.rows) for u in units))
    return nbytes(batch) / 1e6 / (statistics.median(ts))


async def starved_consumer(units: list[WorkerHandle], iters: int) -> tuple[float, float]:
    """Median put latency without and with a consumer waiting for a column never produced,
    alternating the two conditions so machine noise hits both alike."""
    idx = SampleIndex()
    idx.register_task("train", list(COLS))
    idx.register_task("starved", ["never"])
    batch = make_batch(256)
    alone: list[float] = []
    starved: list[float] = []
    async with TransferClient({u.unit: u.url for u in units}, TOKEN) as client:
        for i in range(2 * iters + 2):
            waiter = asyncio.create_task(idx.get_batch("starved", 10**6)) if i % 2 else None
            await asyncio.sleep(0)
            t0 = time.perf_counter()
            await put(client, idx, units, batch)
            dt = time.perf_counter() - t0
            if waiter is not None:
                waiter.cancel()
            m = idx.try_get_batch("train", 256)
            assert m is not None
            idx.ack("train", m.rows)
            if i >= 2:
                (starved if i % 2 else alone).append(dt)
    return ms(alone), ms(starved)


def run_transferqueue(python: str, iters: int) -> dict[str, float] | None:
    script = Path(__file__).with_name("transferqueue_side.py")
    if not script.exists():
        return None
    try:
        out = subprocess.run(
            [python, str(script), "--iters", str(iters)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"TransferQueue run failed: {e}")
        return None
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            data: dict[str, float] = json.loads(line)
            return data
    print("TransferQueue not run:", (out.stderr or out.stdout).strip().splitlines()[-1:])
    return None


async def amain(args: argparse.Namespace) -> None:
    units = list(
        await asyncio.gather(*(spawn_worker("storage", f"su{i}", TOKEN) for i in range(2)))
    )
    try:
        ours = await workload(units, args.iters)
        big = await large_batch(units, args.large_rows)
        base, starved = await starved_consumer(units, args.iters)
    finally:
        await asyncio.gather(*(u.stop() for u in units))
    print(
        f"AsyncFlow data plane, batch of 256 rows ({ours['batch_MB']:.2f} MB), 2 storage "
        f"units, median of {args.iters}:"
    )
    print(f"  put          {ours['put_ms']:8.3f} ms  {ours['put_MBps']:8.0f} MB/s")
    print(f"  get-metadata {ours['get_meta_ms']:8.3f} ms")
    print(f"  get-data     {ours['get_data_ms']:8.3f} ms  {ours['get_data_MBps']:8.0f} MB/s")
    print(
        f"  get-data, {args.large_rows} rows ({args.large_rows * 12292 / 1e6:.0f} MB): "
        f"{big:8.0f} MB/s"
    )
    print("  get-metadata with N rows resident (1 row / 256 rows):")
    for n in (1_000, 64_000, 1_000_000):
        r = meta_latency_resident(n)
        print(f"    {n:>9,}: {r['get_meta_1_ms']:.4f} ms / {r['get_meta_256_ms']:.4f} ms")
    print(
        f"  unrelated put: {base:.2f} ms alone, {starved:.2f} ms with a starved consumer "
        f"waiting (ratio {starved / base:.2f})"
    )
    tq = run_transferqueue(args.tq_python, args.iters)
    if tq is None:
        print("TransferQueue: not available in this run (pass --tq-python); no ratios.")
        return
    print("TransferQueue, same workload:")
    for k in ("put_ms", "get_meta_ms", "get_data_ms", "get_data_MBps"):
        print(f"  {k:14s} {tq[k]:10.3f}")
    print("Ratios (AsyncFlow vs TransferQueue, >1 is better for AsyncFlow):")
    print(f"  put latency      {tq['put_ms'] / ours['put_ms']:6.2f}x")
    print(f"  get-metadata     {tq['get_meta_ms'] / ours['get_meta_ms']:6.2f}x")
    print(f"  get-data MB/s    {ours['get_data_MBps'] / tq['get_data_MBps']:6.2f}x  (target >= 5)")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--large-rows", type=int, default=4096)
    p.add_argument("--tq-python", default=os.environ.get("TQ_PYTHON", sys.executable))
    args = p.parse_args()
    if "GLIBC_TUNABLES" not in os.environ:
        # The consumer here stands for a worker process: give it (and the TransferQueue side,
        # which inherits it) the allocator settings every spawned worker gets. glibc reads
        # them at process start, hence the re-exec.
        env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    try:
        import uvloop

        uvloop.run(amain(args))
    except ImportError:
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
