"""What a run writes for people and plots: per-step JSONL metrics, per-sample records, spans.

Files in the run directory:

- ``metrics.jsonl``: one JSON object per training step (reward, accuracy, loss, KL, entropy,
  staleness histogram, importance-weight stats, tokens/s, time per stage, idle fraction per
  worker) plus ``{"event": "eval", ...}`` lines for held-out evaluations;
- ``samples.jsonl``: one record per trained sample (step, row, group, dataset index, the policy
  version that generated it, reward, length) -- exactly-once checks read this;
- ``spans.jsonl``: one record per unit of work (worker, stage, rows, start, end, version) and per
  weight sync, the raw material of the timeline (``python -m asyncflow.report``);
- ``summary.json`` at the end.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass(slots=True)
class Span:
    worker: str
    stage: str
    start: float
    end: float
    rows: int = 0
    version: int = -1
    step: int = -1

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "stage": self.stage,
            "start": round(self.start, 6),
            "end": round(self.end, 6),
            "rows": self.rows,
            "version": self.version,
            "step": self.step,
        }


@dataclass
class StepStats:
    """Accumulates what one training step saw, then becomes its JSONL line."""

    step: int
    started: float
    rewards: list[float] = field(default_factory=list)
    lags: Counter[int] = field(default_factory=Counter)
    response_tokens: int = 0
    samples: int = 0


class RunLog:
    """Appends metrics, samples and spans to the run directory as the run goes."""

    def __init__(self, run_dir: Path, t0: float | None = None, mode: str = "w") -> None:
        """``mode`` "w" starts the files afresh; "a" appends (a resumed run)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.dir = run_dir
        self.t0 = time.monotonic() if t0 is None else t0
        self._metrics: IO[str] = open(run_dir / "metrics.jsonl", mode, encoding="utf-8")  # noqa: SIM115
        self._samples: IO[str] = open(run_dir / "samples.jsonl", mode, encoding="utf-8")  # noqa: SIM115
        self._spans: IO[str] = open(run_dir / "spans.jsonl", mode, encoding="utf-8")  # noqa: SIM115
        self.spans: list[Span] = []
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.samples_written = _count_lines(run_dir / "samples.jsonl") if mode == "a" else 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def span(self, span: Span) -> None:
        self.spans.append(span)
        self._spans.write(json.dumps(span.to_json()) + "\n")

    def forget_spans(self, until: float) -> None:
        """Drop the in-memory spans that ended by ``until`` (a step record's window start
        never goes back; spans.jsonl keeps them all): each step scans a step's spans, not
        the whole run's."""
        self.spans = [s for s in self.spans if s.end > until]

    def metrics(self, record: dict[str, Any]) -> None:
        for listener in self.listeners:  # live views: /metrics, TensorBoard
            listener(record)
        self._metrics.write(json.dumps(record, default=float) + "\n")
        self._metrics.flush()
        self._spans.flush()

    def samples(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self._samples.write(json.dumps(r) + "\n")
        self._samples.flush()
        self.samples_written += len(records)

    def truncate_samples(self, keep: int, then: list[dict[str, Any]]) -> None:
        """Resuming: keep the first ``keep`` records (those a checkpoint covers), drop any
        written after it by the dead run, and append ``then`` (the checkpointed step's own
        records, saved inside the checkpoint) -- so each trained sample is listed once."""
        self._samples.close()
        path = self.dir / "samples.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep]
        path.write_text("".join(lines), encoding="utf-8")
        self._samples = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self.samples_written = keep
        self.samples(then)

    def close(self) -> None:
        for f in (self._metrics, self._samples, self._spans):
            f.close()


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def busy_by_worker(spans: list[Span], since: float, until: float) -> dict[str, float]:
    """Seconds each worker spent inside spans, clipped to [since, until]; overlapping spans of
    one worker (concurrent requests) count once."""
    by: dict[str, list[tuple[float, float]]] = {}
    for s in spans:
        a, b = max(s.start, since), min(s.end, until)
        if b > a and s.stage != "sync":
            by.setdefault(s.worker, []).append((a, b))
    out = {}
    for w, iv in by.items():
        iv.sort()
        total, cur_a, cur_b = 0.0, iv[0][0], iv[0][1]
        for a, b in iv[1:]:
            if a > cur_b:
                total += cur_b - cur_a
                cur_a, cur_b = a, b
            else:
                cur_b = max(cur_b, b)
        out[w] = total + cur_b - cur_a
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def recorded_steps(metrics_path: Path) -> set[int]:
    """The steps that have a record in a run's metrics.jsonl."""
    if not metrics_path.exists():
        return set()
    out = set()
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "event" not in rec and "step" in rec:
                out.add(int(rec["step"]))
    return out


def recovered_step_record(
    step: int, version: int, samples: list[dict[str, Any]], now: float
) -> dict[str, Any]:
    """The record of a step that was committed (trained, checkpointed) but whose metrics line
    was not written before the controller died -- it is written after the step's weight sync.
    Rebuilt on resume from the checkpoint's sample records; the trainer's loss statistics and
    the step's timings died with the old controller (``recovered: true``, ``step_time_s`` 0)."""
    rewards = [float(s["reward"]) for s in samples]
    lags = Counter(step - int(s["version"]) for s in samples)
    tokens = sum(int(s.get("length") or 0) for s in samples)
    return {
        "step": step,
        "version": version,
        "time_s": now,
        "step_time_s": 0.0,
        "reward_mean": mean(rewards),
        "accuracy": mean([1.0 if r > 0 else 0.0 for r in rewards]),
        "samples": len(samples),
        "response_tokens": tokens,
        "staleness_hist": {str(k): v for k, v in sorted(lags.items())},
        "staleness_mean": sum(k * v for k, v in lags.items()) / max(len(samples), 1),
        "staleness_max": max(lags, default=0),
        "recovered": True,
    }
