"""Reading a finished (or still running) run directory into plain records for the report.

Owns the on-disk view of a run: ``spans.jsonl`` becomes :class:`Span` records,
``metrics.jsonl`` splits into per-step records and ``{"event": "eval"}`` records,
``samples.jsonl`` is reduced to what the report needs (step, version, reward), and the
*training window* every time-based number is measured over is decided here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncflow.runlog import Span

__all__ = ["Run", "Span", "load_run", "training_window"]


@dataclass
class Run:
    """Everything the report reads from one run directory."""

    dir: Path
    spans: list[Span] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)  # one per training step
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"event": "eval", ...}
    samples: list[dict[str, Any]] = field(default_factory=list)  # step, version, reward
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.config.get("run", {}).get("name") or self.dir.name)


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file; a truncated last line (a live run) is skipped."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def load_run(run_dir: Path) -> Run:
    """Read ``run_dir``; missing files give empty lists, so partial runs still report."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    run = Run(dir=run_dir)
    for r in _jsonl(run_dir / "spans.jsonl"):
        run.spans.append(
            Span(
                worker=str(r["worker"]),
                stage=str(r["stage"]),
                start=float(r["start"]),
                end=float(r["end"]),
                rows=int(r.get("rows", 0)),
                version=int(r.get("version", -1)),
                step=int(r.get("step", -1)),
            )
        )
    for r in _jsonl(run_dir / "metrics.jsonl"):
        if r.get("event") == "eval":
            run.evals.append(r)
        elif "step" in r and "event" not in r:
            run.steps.append(r)
    for r in _jsonl(run_dir / "samples.jsonl"):
        keep = ("step", "version", "reward")
        run.samples.append({k: r[k] for k in keep if k in r})
    cfg = run_dir / "config.json"
    if cfg.exists():
        run.config = json.loads(cfg.read_text(encoding="utf-8"))
    return run


def step_bounds(run: Run) -> dict[int, tuple[float, float]]:
    """Wall-clock [start, end) of each training step, from ``time_s`` and ``step_time_s``."""
    out: dict[int, tuple[float, float]] = {}
    for r in run.steps:
        if "time_s" in r and "step_time_s" in r:
            end = float(r["time_s"])
            out[int(r["step"])] = (end - float(r["step_time_s"]), end)
    return out


def training_window(run: Run) -> tuple[float, float]:
    """The interval the idle table covers: first step's start to last step's end.

    Falls back to the first span's start and the last span's end when ``metrics.jsonl`` has
    no step timing (a run that died before its first step). Empty runs give ``(0.0, 0.0)``.
    """
    bounds = step_bounds(run)
    if bounds:
        return min(a for a, _ in bounds.values()), max(b for _, b in bounds.values())
    if run.spans:
        return min(s.start for s in run.spans), max(s.end for s in run.spans)
    return 0.0, 0.0
