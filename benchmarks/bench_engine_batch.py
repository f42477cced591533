"""Benchmark: what a bigger rollout batch saves per sample, on the default workload's engine.

The rollout worker's vLLM engine, built from the default config and pinned to one core as in a
run, generates batches of ``G`` prompts x 8 samples of the built-in task (seeded per request,
as the rollout worker seeds them), for ``--batches`` batches; the last ``--batches - 10`` are
timed. It prints wall and CPU time per batch and per sample for each batch size, and the ratio
of the per-sample cost of each size to the first. This is how docs/benchmarks.md weighs
"two steps in one engine batch" (asynchronous k = 2) against the 2.0x headline.

    python benchmarks/bench_engine_batch.py                      # 8 x 8 against 16 x 8
    python benchmarks/bench_engine_batch.py --groups 8 16 --no-seed
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import torch

from asyncflow.config import load_config
from asyncflow.engines.protocols import SamplingConfig
from asyncflow.roles.settings import RolloutSettings, role_settings
from asyncflow.tasks.sources import prompt_row, resolve_model, train_source
from asyncflow.workers.rollout import make_engine

WARM = 10
SAMPLES = 8


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def measure(groups: int, batches: int, seeded: bool) -> tuple[float, float]:
    """Mean wall and CPU seconds per batch of ``groups`` x 8, after the warm-up batches."""
    from transformers import AutoTokenizer

    cfg = load_config(None, ["rollout.vllm.cpu_threads_bind=0"])
    settings = role_settings(cfg)["rollout"]
    assert isinstance(settings, RolloutSettings)
    os.sched_setaffinity(0, [0])
    torch.set_num_threads(1)
    model = str(resolve_model(settings.model))
    tok = AutoTokenizer.from_pretrained(model)
    train = train_source(settings.data, 0, model)
    engine = make_engine(settings, model)
    await engine.start()
    rid, walls, cpus = 0, [], []
    try:
        for b in range(batches):
            rows = [prompt_row(train, {"index": b * 16 + g}).prompt for g in range(groups)]
            prompts = [tok.encode(p) for p in rows]
            jobs = []
            for p in prompts:
                for _ in range(SAMPLES):
                    rid += 1
                    sampling = SamplingConfig(max_new_tokens=32, seed=rid if seeded else None)
                    jobs.append(engine.generate(f"r{rid}", p, sampling))
            t0, c0 = time.perf_counter(), cpu_s()
            await asyncio.gather(*jobs)
            if b >= WARM:
                walls.append(time.perf_counter() - t0)
                cpus.append(cpu_s() - c0)
    finally:
        await engine.close()
    return sum(walls) / len(walls), sum(cpus) / len(cpus)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, nargs="+", default=[8, 16], help="prompts per batch")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--no-seed", action="store_true", help="unseeded requests")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()
    if args.batches <= WARM:
        raise SystemExit(f"--batches must be more than the {WARM} warm-up batches")
    if args.one:
        wall, cpu = asyncio.run(measure(args.groups[0], args.batches, not args.no_seed))
        print(f"RESULT {wall} {cpu}", flush=True)
        return
    first = None
    for g in args.groups:  # each size in a fresh process: one vLLM engine per process
        cmd = [
            sys.executable,
            __file__,
            "--one",
            "--groups",
            str(g),
            "--batches",
            str(args.batches),
        ]
        out = subprocess.run(cmd + (["--no-seed"] if args.no_seed else []), capture_output=True)
        lines = [x for x in out.stdout.decode().splitlines() if x.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"{g} x {SAMPLES} failed:\n{out.stderr.decode()[-3000:]}")
        wall, cpu = (float(x) for x in lines[-1].split()[1:])
        per = wall / (g * SAMPLES)
        first = per if first is None else first
        print(
            f"{g} x {SAMPLES}: {1000 * wall:.1f} ms/batch wall, {1000 * cpu:.1f} ms CPU, "
            f"{1e6 * per:.0f} us/sample ({per / first:.2f}x of {args.groups[0]} x {SAMPLES})",
            flush=True,
        )


if __name__ == "__main__":
    main()
