"""Interleaved A/B of configurations on the default workload: each variant is a set of dotted
overrides (``--variant "rollout.step_ordered=false"``); every repeat runs every variant once, one
after the other, each in its own process, so the shared machine's load falls on all of them.

    python benchmarks/bench_ab.py --steps 100 --repeats 3 --variant "" \\
        --variant "rollout.step_ordered=false"

Runs the asynchronous default (k = 1, streaming) unless a variant overrides it; prints samples/s
of every run, the median of each variant and its ratio to the first variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

RUN = """
import json, sys, uvloop
from asyncflow.config import load_config
from asyncflow.controller.controller import Controller
async def main():
    print("RESULT " + json.dumps(await Controller(load_config(None, sys.argv[1:])).run()))
uvloop.run(main())
"""


def run_once(steps: int, out_dir: str, name: str, overrides: list[str]) -> dict[str, float]:
    args = [
        f"algorithm.steps={steps}",
        "eval.every=0",
        "eval.size=256",
        "run.seed=0",
        "run.progress=false",
        f"run.output_dir={out_dir}",
        f"run.name={name}",
        *overrides,
    ]
    out = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"run {name} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(lines[0][len("RESULT ") :])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", action="append", default=[], help="space-separated overrides")
    args = p.parse_args()
    variants = args.variant or [""]
    out_dir = tempfile.mkdtemp(prefix="asyncflow-ab-")
    speeds: list[list[float]] = [[] for _ in variants]
    for rep in range(args.repeats):
        for i, v in enumerate(variants):
            s = run_once(args.steps, out_dir, f"v{i}-r{rep}", v.split())
            speeds[i].append(s["samples_per_s"])
            print(
                f"repeat {rep} variant {i} [{v or 'default'}]: {s['samples_per_s']:.1f} "
                f"samples/s, held-out acc {s['eval_accuracy_end']:.3f}",
                flush=True,
            )
    base = statistics.median(speeds[0])
    for i, v in enumerate(variants):
        med = statistics.median(speeds[i])
        runs = ", ".join(f"{x:.1f}" for x in speeds[i])
        print(f"[{v or 'default'}] median {med:.1f} samples/s ({runs}); {med / base:.2f}x of first")


if __name__ == "__main__":
    main()
