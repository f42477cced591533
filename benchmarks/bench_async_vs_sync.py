"""The headline: the same GRPO workload synchronously and asynchronously, in one run.

Both runs use the same model, task, steps, batch and seed; only two settings differ:
``algorithm.staleness`` (0 vs 1) and ``algorithm.streaming`` (off vs on). Prints samples/s and
tokens/s of each (training wall time, start-up and evaluation excluded), their ratio, the idle
fraction of each worker, and the final held-out accuracy of each.

    python benchmarks/bench_async_vs_sync.py [--steps 150] [--all-rows] [key=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

from asyncflow.config import load_config
from asyncflow.controller.controller import Controller

SYNC = ["algorithm.staleness=0", "algorithm.streaming=false"]
MODES = {  # name -> (run-directory tag, overrides)
    "sync (k=0, no streaming)": ("sync", SYNC),
    # A synchronous loop never runs two phases at once, so pinning rollout and trainer to
    # separate cores only idles half the machine in each phase: measure it unpinned too (each
    # phase may use every core) and compare against the faster of the two.
    "sync, unpinned": ("sync-unpinned", [*SYNC, "run.pin_cpus=false"]),
    "async (k=1, streaming)": ("async", ["algorithm.staleness=1", "algorithm.streaming=true"]),
}


def idle(run_dir: Path) -> dict[str, float]:
    steps = [
        json.loads(x)
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if x.strip() and '"event"' not in x
    ]
    names = steps[0]["idle_frac"].keys() if steps else []
    return {n: statistics.mean(s["idle_frac"][n] for s in steps) for n in names}


async def run_mode(tag: str, extra: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(
        None,
        [
            f"algorithm.steps={args.steps}",
            "eval.every=0",
            f"eval.size={args.eval_size}",
            f"run.name=bench-{tag}",
            f"run.output_dir={args.output_dir}",
            "run.progress=false",
            f"run.seed={args.seed}",
            *extra,
            *args.overrides,
        ],
    )
    summary = await Controller(cfg).run()
    summary["idle"] = idle(cfg.run_dir)
    return summary


ALL_ROWS = "algorithm.skip_zero_advantage=false"
MODES_ALL_ROWS = {  # --all-rows: the pinned sync and the async run again, training every row
    "sync, all rows": ("sync-all-rows", [*SYNC, ALL_ROWS]),
    "async, all rows": ("async-all-rows", [*MODES["async (k=1, streaming)"][1], ALL_ROWS]),
}


async def amain(args: argparse.Namespace) -> None:
    results = {}
    modes = {**MODES, **(MODES_ALL_ROWS if args.all_rows else {})}
    for name, (tag, extra) in modes.items():
        print(f"running {name} for {args.steps} steps ...", flush=True)
        results[name] = await run_mode(tag, extra, args)
    print()
    print(
        f"{'mode':28s} {'samples/s':>10s} {'tokens/s':>10s} {'acc start':>10s} "
        f"{'acc end':>8s}  idle fraction per worker"
    )
    for name, s in results.items():
        idle_txt = ", ".join(f"{w} {v:.2f}" for w, v in s["idle"].items())
        print(
            f"{name:28s} {s['samples_per_s']:10.1f} {s['tokens_per_s']:10.0f} "
            f"{s['eval_accuracy_start']:10.3f} {s['eval_accuracy_end']:8.3f}  {idle_txt}"
        )
    asyn = results["async (k=1, streaming)"]
    sync = max(
        (s for n, s in results.items() if n.startswith("sync") and n in MODES),
        key=lambda s: s["samples_per_s"],
    )
    print(f"\nbaseline: the faster synchronous run ({sync['samples_per_s']:.1f} samples/s)")
    print(
        f"async / sync: samples/s {asyn['samples_per_s'] / sync['samples_per_s']:.2f}x, "
        f"tokens/s {asyn['tokens_per_s'] / sync['tokens_per_s']:.2f}x "
        f"(target >= 2.0; the paper reports 1.59 on average)"
    )
    print(
        f"final held-out accuracy: sync {sync['eval_accuracy_end']:.3f}, "
        f"async {asyn['eval_accuracy_end']:.3f} ({args.eval_size} problems, ~+-3 points)"
    )
    if args.all_rows:
        a, s = results["async, all rows"], results["sync, all rows"]
        print(
            f"training every row (skip_zero_advantage=false): async / sync samples/s "
            f"{a['samples_per_s'] / s['samples_per_s']:.2f}x ({a['samples_per_s']:.1f} vs "
            f"{s['samples_per_s']:.1f}); skipping makes the trainer's share smaller, so there "
            f"is less for the overlap to hide"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--output-dir", default="runs/bench")
    p.add_argument(
        "--all-rows",
        action="store_true",
        help="also run sync and async with algorithm.skip_zero_advantage=false (every row "
        "trained, as before that optimisation) and print that ratio too",
    )
    p.add_argument("overrides", nargs="*", help="config overrides applied to both modes")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.run(amain(args))
    except ImportError:
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
