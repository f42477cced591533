"""The report's PNG plots, drawn with matplotlib's Agg canvas (no pyplot, no display, safe in a
worker thread): a Gantt chart of a few steps, learning curves, throughput, staleness.

Each ``plot_*`` function takes a loaded :class:`~asyncflow.report.run.Run` and a path and
returns the path it wrote, or ``None`` when the run has nothing to draw (no steps yet).
Importing this module imports matplotlib; callers that must survive without it import it
inside a ``try``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from asyncflow.report.run import Run, Span, step_bounds
from asyncflow.report.trace import Event, assign_lanes

__all__ = ["gantt_steps", "plot_curves", "plot_gantt", "plot_staleness", "plot_throughput"]

SYNC_COLOUR = "#d62728"
PALETTE = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    """Trailing moving average over ``n`` points (shorter at the start), NaN-free input."""
    if n <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - n, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in run.steps if isinstance(r.get(key), int | float)]
    pts = [(s, v) for s, v in pts if np.isfinite(v)]
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def _bounds(run: Run) -> dict[int, tuple[float, float]]:
    """Step bounds from metrics, else from the spans' own ``step`` field."""
    bounds = step_bounds(run)
    if bounds:
        return bounds
    by: dict[int, list[Span]] = {}
    for s in run.spans:
        if s.step >= 0:
            by.setdefault(s.step, []).append(s)
    return {k: (min(s.start for s in v), max(s.end for s in v)) for k, v in by.items()}


def gantt_steps(run: Run, n: int = 3) -> list[int]:
    """The default steps for the Gantt chart: ``n`` consecutive steps in the middle of the run."""
    steps = sorted(_bounds(run))
    mid = max(len(steps) // 2 - n // 2, 0)
    return steps[mid : mid + n]


def _stage_colours(spans: list[Span]) -> dict[str, str]:
    stages = [s for s in dict.fromkeys(sp.stage for sp in spans) if s != "sync"]
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(stages)}
    colours["sync"] = SYNC_COLOUR
    return colours


def _draw_worker(ax: Axes, row: int, spans: list[Span], colours: dict[str, str]) -> None:
    """One worker's band at y = ``row``; concurrent spans are stacked in thin sub-rows."""
    events = [Event(s.stage, round(s.start * 1e6), round(s.end * 1e6), {}) for s in spans]
    lanes = assign_lanes(events)
    h = 0.8 / max(len(lanes), 1)
    for i, lane in enumerate(lanes):
        y = row - 0.4 + i * h
        bars = [(e.ts / 1e6, (e.end - e.ts) / 1e6) for e in lane]
        cols = [colours[e.name] for e in lane]
        ax.broken_barh(bars, (y, h * 0.9), facecolors=cols, edgecolor="none")


def plot_gantt(run: Run, path: Path, steps: list[int] | None = None) -> Path | None:
    """Worker activity over ``steps`` (default :func:`gantt_steps`): one row per worker."""
    bounds = _bounds(run)
    steps = [s for s in (steps or gantt_steps(run)) if s in bounds]
    if not steps or not run.spans:
        return None
    lo, hi = min(bounds[s][0] for s in steps), max(bounds[s][1] for s in steps)
    shown = [s for s in run.spans if s.end > lo and s.start < hi]
    workers = list(dict.fromkeys(s.worker for s in run.spans))
    colours = _stage_colours(run.spans)
    fig = Figure(figsize=(12, 1.0 + 0.7 * len(workers)))
    ax = fig.add_subplot()
    for row, w in enumerate(workers):
        _draw_worker(ax, row, [s for s in shown if s.worker == w], colours)
    for s in steps:
        a, b = bounds[s]
        ax.axvline(a, color="grey", lw=0.8, ls="--")
        ax.text((a + b) / 2, -0.62, f"step {s}", ha="center", va="center", fontsize=9)
    ax.axvline(hi, color="grey", lw=0.8, ls="--")
    ax.set_xlim(lo, hi)
    ax.set_ylim(len(workers) - 0.5, -0.8)
    ax.set_yticks(range(len(workers)), workers)
    ax.set_xlabel("seconds since run start")
    algo = run.config.get("algorithm", {})
    extra = f", staleness ≤ {algo['staleness']}" if "staleness" in algo else ""
    extra += ", streaming" if algo.get("streaming") else ""
    ax.set_title(f"{run.name}: worker activity, steps {steps[0]}–{steps[-1]}{extra}")
    handles = [Patch(color=c, label=s) for s, c in colours.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _save(fig, path)


def plot_curves(run: Run, path: Path) -> Path | None:
    """Reward and accuracy per step (raw, faint; moving average, solid) and eval accuracy."""
    x, reward = _series(run, "reward_mean")
    xa, acc = _series(run, "accuracy")
    if len(x) == 0 and len(xa) == 0:
        return None
    n = max(1, max(len(x), len(xa)) // 30)
    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    lines = [(x, reward, "reward", "C0"), (xa, acc, "accuracy", "C1")]
    if np.array_equal(x, xa) and np.allclose(reward, acc):  # 0/1 rewards: one curve, not two
        lines = [(x, reward, "reward = accuracy", "C0")]
    for xs, ys, label, c in lines:
        ax.plot(xs, ys, color=c, alpha=0.25, lw=0.8)
        ax.plot(xs, _smooth(ys, n), color=c, lw=1.8, label=f"{label} (mean of {n})")
    ev = [(r["step"], r["eval_accuracy"]) for r in run.evals if "eval_accuracy" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", color="C3", ms=6, label="eval accuracy (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.set_title(f"{run.name}: learning curves")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_throughput(run: Run, path: Path) -> Path | None:
    """Samples/s and tokens/s per step against wall-clock time, with the run-wide average."""
    rows = [r for r in run.steps if "time_s" in r and "samples_per_s" in r]
    if not rows:
        return None
    t = np.array([r["time_s"] for r in rows], dtype=float)
    bounds = step_bounds(run)
    span = (
        (max(b for _, b in bounds.values()) - min(a for a, _ in bounds.values())) if bounds else 0
    )
    n = max(1, len(rows) // 30)
    fig = Figure(figsize=(10, 6))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, key, total_key, unit in (
        (axes[0], "samples_per_s", "samples", "samples/s"),
        (axes[1], "tokens_per_s", "response_tokens", "tokens/s"),
    ):
        y = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        ok = np.isfinite(y)
        ax.plot(t[ok], y[ok], color="C0", alpha=0.3, lw=0.8, label="per step")
        ax.plot(t[ok], _smooth(y[ok], n), color="C0", lw=1.8, label=f"mean of {n} steps")
        if span > 0:
            avg = sum(r.get(total_key, 0) for r in rows) / span
            ax.axhline(avg, color="C3", ls="--", lw=1, label=f"run average {avg:,.0f}")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[1].set_xlabel("seconds since run start")
    axes[0].set_title(f"{run.name}: throughput")
    return _save(fig, path)


def plot_staleness(run: Run, path: Path) -> Path | None:
    """Histogram of per-sample staleness ``step - version`` (from ``samples.jsonl``)."""
    lags: Counter[int] = Counter(
        int(r["step"]) - int(r["version"]) for r in run.samples if "step" in r and "version" in r
    )
    if not lags:
        for r in run.steps:
            lags.update({int(k): int(v) for k, v in r.get("staleness_hist", {}).items()})
    if not lags:
        return None
    total = sum(lags.values())
    ks = list(range(min(lags), max(lags) + 1))
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    bars = ax.bar(ks, [lags[k] for k in ks], color="C0", width=0.7)
    ax.bar_label(bars, labels=[f"{100 * lags[k] / total:.1f}%" for k in ks], fontsize=9)
    ax.set_xticks(ks)
    ax.set_xlabel("staleness (trained at step − generated by policy version)")
    ax.set_ylabel("samples")
    ax.set_title(f"{run.name}: staleness of {total:,} trained samples")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
