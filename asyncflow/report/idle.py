"""Per-worker time accounting over the training window: busy, waiting for data, for weights.

Definitions (each over the training window ``W = [first step start, last step end]`` from
:func:`asyncflow.report.run.training_window`, every span clipped to ``W``):

- **busy** = the length of the *union* of the worker's spans other than ``sync``. A worker
  can run several requests at once (a rollout engine with 8 groups in flight); overlapping
  spans count once, so busy never exceeds the window.
- **waiting for weights** = the length of the union of the worker's ``sync`` spans, less any
  part of it that is already busy (busy wins where they overlap, so nothing counts twice).
  For rollout workers this is an approximation: time where admission is blocked waiting for
  a newer policy version outside a sync span is not in any span and lands in "data" below.
- **waiting for data** = the rest of the window: ``|W| - busy - weights``. The worker had no
  work in hand (its inputs were not ready, or the controller had nothing to give it).
- **idle fraction** = ``(|W| - busy) / |W|`` = (data + weights) / window.

So ``busy + waiting_data + waiting_weights == window`` for every worker, exactly up to float
rounding; the table rounds to milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from asyncflow.report.run import Run, Span, training_window

Interval = tuple[float, float]

__all__ = ["WorkerTime", "idle_table", "measure", "merge", "write_idle"]


@dataclass(frozen=True, slots=True)
class WorkerTime:
    worker: str
    window_s: float
    busy_s: float
    waiting_data_s: float
    waiting_weights_s: float

    @property
    def idle_frac(self) -> float:
        return 1.0 - self.busy_s / self.window_s if self.window_s > 0 else 0.0


def merge(intervals: list[Interval]) -> list[Interval]:
    """Union of intervals as sorted, disjoint intervals (touching ones are joined)."""
    out: list[Interval] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def measure(intervals: list[Interval]) -> float:
    """Total length of a union of intervals."""
    return sum(b - a for a, b in merge(intervals))


def _intersection(xs: list[Interval], ys: list[Interval]) -> float:
    """Length of (union xs) ∩ (union ys), by a two-pointer sweep over the merged lists."""
    xs, ys = merge(xs), merge(ys)
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, b - a)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def _clip(spans: list[Span], lo: float, hi: float) -> list[Interval]:
    return [(max(s.start, lo), min(s.end, hi)) for s in spans if min(s.end, hi) > max(s.start, lo)]


def idle_table(run: Run, window: Interval | None = None) -> list[WorkerTime]:
    """One :class:`WorkerTime` per worker seen in the spans, in order of first appearance."""
    lo, hi = window if window is not None else training_window(run)
    total = max(hi - lo, 0.0)
    workers = list(dict.fromkeys(s.worker for s in run.spans))
    out = []
    for w in workers:
        mine = [s for s in run.spans if s.worker == w]
        work = _clip([s for s in mine if s.stage != "sync"], lo, hi)
        sync = _clip([s for s in mine if s.stage == "sync"], lo, hi)
        busy = measure(work)
        weights = measure(sync) - _intersection(sync, work)
        data = max(total - busy - weights, 0.0)
        out.append(WorkerTime(w, total, busy, data, weights))
    return out


def _markdown(rows: list[WorkerTime], window: Interval, run_name: str) -> str:
    lo, hi = window
    lines = [
        f"# Worker time: {run_name}",
        "",
        f"Training window {lo:.3f}s – {hi:.3f}s ({hi - lo:.3f}s). busy = union of the worker's"
        " spans other than syncs; waiting for weights = sync spans not also busy; waiting for"
        " data = the rest. busy + data + weights = window.",
        "",
        "| worker | busy s | waiting for data s | waiting for weights s | idle fraction |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.worker} | {r.busy_s:.3f} | {r.waiting_data_s:.3f} "
            f"| {r.waiting_weights_s:.3f} | {r.idle_frac:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_idle(run: Run, out_dir: Path) -> dict[str, Path]:
    """Write ``idle.md`` and ``idle.json`` into ``out_dir``."""
    window = training_window(run)
    rows = idle_table(run, window)
    md, js = out_dir / "idle.md", out_dir / "idle.json"
    md.write_text(_markdown(rows, window, run.name), encoding="utf-8")
    payload = {
        "window": {"start_s": window[0], "end_s": window[1], "length_s": window[1] - window[0]},
        "workers": [asdict(r) | {"idle_frac": r.idle_frac} for r in rows],
    }
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return {"idle_md": md, "idle_json": js}
