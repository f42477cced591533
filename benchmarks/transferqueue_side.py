"""TransferQueue side of ``bench_transfer.py``: the same workload on TransferQueue's own API.

Runs under the Python of ``.venv-tq`` (``bash scripts/setup_transferqueue.sh``), never under the
AsyncFlow venv. It starts a private local Ray instance, brings TransferQueue up the way verl's
integration does (``transfer_queue.init`` with the SimpleStorage backend and two storage units,
then ``transfer_queue.get_client()``), and times, per batch of 256 rows of ``input_ids`` int64
[512], ``attention_mask`` int64 [512], ``old_log_probs`` float32 [512] and a scalar ``reward``:

* put:       ``client.put(TensorDict, partition_id=...)`` (insert metadata + write to the units),
* get_meta:  ``client.get_meta(fields, 256, partition_id, mode="fetch", task_name=...)``,
* get_data:  ``client.get_data(meta)`` (a TensorDict whose [512] columns are jagged nested tensors),
* densify:   turning those nested columns into dense [256, 512] tensors (reported apart),

after a few warm-up rounds, medians over ``--iters``. It also times ``get_meta`` of 1 and 256
rows with 1k and 64k rows of the same columns resident. It prints a human summary and, as its
last stdout line, one JSON object (``put_ms``, ``get_meta_ms``, ``get_data_ms``,
``get_data_MBps`` and more), which ``bench_transfer.py`` reads.

    .venv-tq/bin/python benchmarks/transferqueue_side.py [--iters 30] [--no-resident]

Ray is kept local (its own instance, no dashboard, driver logs off) and shut down at the end;
an alarm stops the run after ``--time-limit`` seconds. Ray gets 3 logical CPUs because
TransferQueue's controller and each storage unit reserve one; on this 2-core machine that is
bookkeeping only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TQ_LOGGING_LEVEL", "ERROR")  # read by transfer_queue at import
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray
import torch
import transfer_queue as tq
from omegaconf import OmegaConf
from tensordict import TensorDict

COLS = ["input_ids", "attention_mask", "old_log_probs", "reward"]
TASK = "train"


def make_batch(n: int, seq: int = 512) -> TensorDict:
    return TensorDict(
        {
            "input_ids": torch.randint(0, 50_000, (n, seq), dtype=torch.int64),
            "attention_mask": torch.ones(n, seq, dtype=torch.int64),
            "old_log_probs": torch.randn(n, seq),
            "reward": torch.randn(n),
        },
        batch_size=[n],
    )


def nbytes(batch: TensorDict) -> int:
    return sum(t.nbytes for t in batch.values())


def densify(data: TensorDict) -> dict[str, torch.Tensor]:
    """Dense tensors from get_data's columns (jagged nested for [512] rows, dense for scalars)."""
    out = {}
    for k in COLS:
        t = data[k]
        out[k] = t.to_padded_tensor(0) if t.is_nested else t
    return out


def ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def workload(client: Any, iters: int, warmup: int) -> dict[str, float]:
    batch = make_batch(256)
    mb = nbytes(batch) / 1e6
    t_put: list[float] = []
    t_meta: list[float] = []
    t_data: list[float] = []
    t_dense: list[float] = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        client.put(data=batch, partition_id="bench")
        t1 = time.perf_counter()
        meta = client.get_meta(
            data_fields=COLS, batch_size=256, partition_id="bench", mode="fetch", task_name=TASK
        )
        t2 = time.perf_counter()
        data = client.get_data(meta)
        t3 = time.perf_counter()
        dense = densify(data)
        t4 = time.perf_counter()
        assert dense["input_ids"].shape == (256, 512), dense["input_ids"].shape
        assert dense["reward"].shape == (256,), dense["reward"].shape
        client.clear_samples(meta)
        if i >= warmup:
            t_put.append(t1 - t0)
            t_meta.append(t2 - t1)
            t_data.append(t3 - t2)
            t_dense.append(t4 - t3)
    # Spot-check that rows come back intact (order follows the metadata's global indexes).
    put_meta = client.put(data=batch, partition_id="bench")
    meta = client.get_meta(
        data_fields=COLS, batch_size=256, partition_id="bench", mode="fetch", task_name=TASK
    )
    got = densify(client.get_data(meta))
    row_of = {g: i for i, g in enumerate(put_meta.global_indexes)}
    order = torch.tensor([row_of[g] for g in meta.global_indexes])
    for k in COLS:
        assert torch.equal(got[k], batch[k][order]), k
    client.clear_samples(meta)
    return {
        "batch_MB": mb,
        "put_ms": ms(t_put),
        "put_MBps": mb / (ms(t_put) / 1e3),
        "get_meta_ms": ms(t_meta),
        "get_data_ms": ms(t_data),
        "get_data_MBps": mb / (ms(t_data) / 1e3),
        "densify_ms": ms(t_dense),
        "get_data_dense_MBps": mb / ((ms(t_data) + ms(t_dense)) / 1e3),
    }


def meta_latency_resident(client: Any, resident: int, reps: int) -> dict[str, float]:
    """get_meta latency (1 row, 256 rows) with ``resident`` ready rows in one partition.

    A fetch marks its rows consumed; an untimed ``reset_consumption`` after each one keeps all
    ``resident`` rows unconsumed for the next.
    """
    pid = f"resident_{resident}"
    chunk = make_batch(min(4096, resident))
    left = resident
    while left > 0:
        n = min(left, len(chunk))
        client.put(data=chunk[:n], partition_id=pid)
        left -= n
    out: dict[str, float] = {}
    for n in (1, 256):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            meta = client.get_meta(
                data_fields=COLS, batch_size=n, partition_id=pid, mode="fetch", task_name=TASK
            )
            ts.append(time.perf_counter() - t0)
            assert meta.size == n, meta.size
            client.reset_consumption(pid, TASK)
        out[f"get_meta_{n}_ms"] = ms(ts)
    client.clear_partition(pid)
    return out


def start(num_units: int) -> Any:
    ray.init(
        address="local",
        num_cpus=1 + num_units,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        namespace="tq_bench",
    )
    conf = OmegaConf.create(
        {
            "controller": {"sampler": "SequentialSampler", "polling_mode": False},
            "backend": {
                "storage_backend": "SimpleStorage",
                "SimpleStorage": {"num_data_storage_units": num_units},
            },
        }
    )
    tq.init(conf)
    return tq.get_client()


def stop() -> None:
    try:
        tq.close()
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--resident-reps", type=int, default=100)
    p.add_argument("--no-resident", action="store_true", help="skip the 1k/64k resident timings")
    p.add_argument("--time-limit", type=int, default=270, help="seconds before the run gives up")
    args = p.parse_args()

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"TransferQueue benchmark ran past {args.time_limit}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.time_limit)
    t_start = time.perf_counter()
    try:
        client = start(num_units=2)
        res = workload(client, args.iters, args.warmup)
        resident: dict[int, dict[str, float]] = {}
        if not args.no_resident:
            for n in (1_000, 64_000):
                resident[n] = meta_latency_resident(client, n, args.resident_reps)
    finally:
        signal.alarm(0)
        stop()

    print(
        f"TransferQueue {tq.__version__} (SimpleStorage, 2 storage units on local Ray), batch of "
        f"256 rows ({res['batch_MB']:.2f} MB), median of {args.iters}:"
    )
    print(f"  put          {res['put_ms']:8.3f} ms  {res['put_MBps']:8.0f} MB/s")
    print(f"  get-metadata {res['get_meta_ms']:8.3f} ms")
    print(f"  get-data     {res['get_data_ms']:8.3f} ms  {res['get_data_MBps']:8.0f} MB/s")
    print(
        f"  densify      {res['densify_ms']:8.3f} ms  (nested -> dense; get-data + densify "
        f"{res['get_data_dense_MBps']:.0f} MB/s)"
    )
    if resident:
        print("  get-metadata with N rows resident (1 row / 256 rows):")
        for n, r in resident.items():
            print(f"    {n:>9,}: {r['get_meta_1_ms']:.4f} ms / {r['get_meta_256_ms']:.4f} ms")
            k = f"{n // 1000}k"
            res[f"get_meta_1_ms_{k}"] = r["get_meta_1_ms"]
            res[f"get_meta_256_ms_{k}"] = r["get_meta_256_ms"]
    res["iters"] = args.iters
    res["wall_s"] = time.perf_counter() - t_start
    res["tq_version"] = tq.__version__
    print(f"  ({res['wall_s']:.0f} s in all)")
    sys.stdout.flush()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
