"""Interleaved A/B of configurations on the default workload: each variant is a set of dotted
overrides (``--variant "rollout.step_ordered=false"``); every repeat runs every variant once, one
after the other, each in its own process, so the shared machine's load falls on all of them.

    python benchmarks/bench_ab.py --steps 100 --repeats 3 --variant "" \\
        --variant "rollout.step_ordered=false"

Runs the asynchronous default (k = 1, streaming) unless a variant overrides it; prints samples/s
of every run, the median of each variant and its ratio to the first variant.

``--tree PATH`` (repeatable) runs every variant on each source tree too -- e.g. a checkout of
an earlier commit (``git worktree add /tmp/before COMMIT``) against this one -- interleaved the
same way, with the same Python environment; the first tree (default: this checkout) is the
baseline of the ratios:

    python benchmarks/bench_ab.py --steps 100 --repeats 3 --tree /tmp/before --tree .
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

RUN = """
import json, sys, uvloop
import asyncflow
from asyncflow.config import load_config
from asyncflow.controller.controller import Controller
async def main():
    summary = await Controller(load_config(None, sys.argv[1:])).run()
    print("RESULT " + json.dumps({**summary, "source": asyncflow.__file__}))
uvloop.run(main())
"""


def run_once(
    steps: int, out_dir: str, name: str, overrides: list[str], tree: str | None = None
) -> dict[str, float]:
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
    env = None
    if tree is not None:  # this tree's asyncflow ahead of the installed one
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    out = subprocess.run(
        [sys.executable, "-c", RUN, *args], capture_output=True, text=True, env=env, cwd=tree
    )
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
    p.add_argument("--tree", action="append", default=[], help="a source tree to run (repeatable)")
    args = p.parse_args()
    trees: list[str | None] = list(args.tree) or [None]
    cases = [(t, v) for t in trees for v in (args.variant or [""])]
    out_dir = tempfile.mkdtemp(prefix="asyncflow-ab-")
    speeds: list[list[float]] = [[] for _ in cases]

    def label(i: int) -> str:
        tree, v = cases[i]
        return f"{tree or '.'} [{v or 'default'}]" if tree else f"[{v or 'default'}]"

    for rep in range(args.repeats):
        for i, (tree, v) in enumerate(cases):
            s = run_once(args.steps, out_dir, f"v{i}-r{rep}", v.split(), tree)
            speeds[i].append(s["samples_per_s"])
            print(
                f"repeat {rep} {label(i)}: {s['samples_per_s']:.1f} samples/s, "
                f"held-out acc {s['eval_accuracy_end']:.3f} ({s['source']})",
                flush=True,
            )
    base = statistics.median(speeds[0])
    for i in range(len(cases)):
        med = statistics.median(speeds[i])
        runs = ", ".join(f"{x:.1f}" for x in speeds[i])
        print(f"{label(i)} median {med:.1f} samples/s ({runs}); {med / base:.2f}x of first")


if __name__ == "__main__":
    main()
