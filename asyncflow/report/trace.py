"""Chrome / Perfetto trace-event JSON of a run's spans (open in ui.perfetto.dev or chrome://tracing).

Layout (one process, the run):

- one track (``tid``) per worker, named after it. A worker can run several requests at
  once (a rollout engine with 8 groups in flight), and a trace viewer draws overlapping
  complete events on one track as a broken stack, so overlapping spans of one worker are
  spread over *sub-tracks* ``worker/1``, ``worker/2``, … by greedy interval partitioning:
  each span goes to the lowest-numbered of the worker's tracks whose last event has ended.
  Invariant: events never overlap on any track; the number of a worker's tracks is its peak
  concurrency.
- weight syncs appear on each participating worker's track (stage ``sync``) and once more,
  deduplicated, on a ``weight sync`` track whose args list the workers.
- a ``steps`` track with one event per training step (from ``metrics.jsonl``).

Times are integer microseconds since run start (``ts``, ``dur``); ends are rounded first and
``dur = round(end) - round(start)``, so rounding cannot create an overlap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncflow.report.run import Run, step_bounds

__all__ = ["Event", "assign_lanes", "trace_events", "write_trace"]

PID = 1


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    ts: int  # microseconds since run start
    end: int
    args: dict[str, Any]


def _us(t: float) -> int:
    return round(t * 1e6)


def assign_lanes(events: list[Event]) -> list[list[Event]]:
    """Greedy interval partitioning: lanes of non-overlapping events, as few as possible."""
    lanes: list[list[Event]] = []
    for e in sorted(events, key=lambda e: (e.ts, e.end)):
        for lane in lanes:
            if lane[-1].end <= e.ts:
                lane.append(e)
                break
        else:
            lanes.append([e])
    return lanes


def _tracks(run: Run) -> dict[str, list[Event]]:
    """Track name -> events, before splitting into lanes; insertion order is display order."""
    tracks: dict[str, list[Event]] = {}
    syncs: dict[tuple[int, int, int], list[str]] = {}
    for s in run.spans:
        args = {"stage": s.stage, "rows": s.rows, "version": s.version, "step": s.step}
        tracks.setdefault(s.worker, []).append(Event(s.stage, _us(s.start), _us(s.end), args))
        if s.stage == "sync":
            syncs.setdefault((_us(s.start), _us(s.end), s.version), []).append(s.worker)
    tracks["weight sync"] = [
        Event(f"sync v{v}", a, b, {"stage": "sync", "version": v, "workers": ws})
        for (a, b, v), ws in syncs.items()
    ]
    tracks["steps"] = [
        Event(f"step {k}", _us(a), _us(b), {"step": k})
        for k, (a, b) in sorted(step_bounds(run).items())
    ]
    return {k: v for k, v in tracks.items() if v}


def _meta(tid: int, name: str) -> list[dict[str, Any]]:
    return [
        {"ph": "M", "pid": PID, "tid": tid, "name": "thread_name", "args": {"name": name}},
        {
            "ph": "M",
            "pid": PID,
            "tid": tid,
            "name": "thread_sort_index",
            "args": {"sort_index": tid},
        },
    ]


def trace_events(run: Run) -> list[dict[str, Any]]:
    """The ``traceEvents`` list: metadata first, then one "X" event per span."""
    out: list[dict[str, Any]] = [
        {"ph": "M", "pid": PID, "name": "process_name", "args": {"name": f"asyncflow {run.name}"}}
    ]
    tid = 0
    for track, events in _tracks(run).items():
        for i, lane in enumerate(assign_lanes(events)):
            tid += 1
            out += _meta(tid, track if i == 0 else f"{track}/{i}")
            for e in lane:
                x = {
                    "ph": "X",
                    "pid": PID,
                    "tid": tid,
                    "name": e.name,
                    "cat": e.args.get("stage", "step"),
                }
                out.append(x | {"ts": e.ts, "dur": e.end - e.ts, "args": e.args})
    return out


def write_trace(run: Run, out_dir: Path) -> dict[str, Path]:
    """Write ``trace.json`` (object form, ``displayTimeUnit`` ms) into ``out_dir``."""
    path = out_dir / "trace.json"
    doc = {"traceEvents": trace_events(run), "displayTimeUnit": "ms"}
    path.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    return {"trace": path}
