"""Reward scoring: one hand-off per sample (``score`` per sample, gathered) vs one per call
(``score_many``), for the built-in verifier in-process and a user function in child processes.

    python benchmarks/bench_reward_scoring.py [--samples 64] [--rounds 20]

Prints milliseconds per call (median over rounds) and the ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from asyncflow.rewards.functions import RewardScorer
from asyncflow.rewards.math import arithmetic_reward

USER_FN = "def exact(prompt, response, answer):\n    return 1.0 if response == answer else 0.0\n"


async def timed(scorer: RewardScorer, items: list[tuple[str, str, str]], many: bool) -> float:
    t0 = time.perf_counter()
    if many:
        await scorer.score_many(items)
    else:
        await asyncio.gather(*(scorer.score(*it) for it in items))
    return (time.perf_counter() - t0) * 1000


async def main(samples: int, rounds: int) -> None:
    items = [("What is 2+3?", "5>5", "5")] * samples
    folder = tempfile.mkdtemp()
    (Path(folder) / "bench_user_reward.py").write_text(USER_FN)
    sys.path.insert(0, folder)
    cases = [
        ("built-in, in-process", RewardScorer(arithmetic_reward, isolate=False)),
        ("user function, 2 processes", RewardScorer("bench_user_reward:exact", num_workers=2)),
    ]
    print(f"{samples} samples per call, median of {rounds} rounds (interleaved), ms per call")
    for name, scorer in cases:
        await scorer.start()
        await timed(scorer, items, True)  # warm up
        each, many = [], []
        for _ in range(rounds):
            each.append(await timed(scorer, items, False))
            many.append(await timed(scorer, items, True))
        await scorer.aclose()
        a, b = statistics.median(each), statistics.median(many)
        print(f"{name:34s} per sample {a:7.2f}   per call {b:7.2f}   ratio {a / b:5.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    asyncio.run(main(args.samples, args.rounds))
