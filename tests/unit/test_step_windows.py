"""Per-step busy fractions: overlapping spans of a worker count once, and forgetting the
spans that ended before a step's window changes no later window (spans.jsonl keeps them)."""

import json
import random
from pathlib import Path

from asyncflow.runlog import RunLog, Span, busy_by_worker


def test_busy_counts_overlaps_once_and_clips_to_the_window() -> None:
    spans = [
        Span("a", "rollout", 0.0, 2.0),
        Span("a", "rollout", 1.0, 3.0),  # overlaps the first: [0, 3] once
        Span("a", "sync", 0.0, 10.0),  # sync is not work
        Span("b", "train", 2.5, 5.0),
    ]
    assert busy_by_worker(spans, 0.0, 10.0) == {"a": 3.0, "b": 2.5}
    assert busy_by_worker(spans, 2.0, 4.0) == {"a": 1.0, "b": 1.5}


def test_forgetting_old_spans_changes_no_later_window(tmp_path: Path) -> None:
    rng = random.Random(0)
    log, kept = RunLog(tmp_path), RunLog(tmp_path / "all")
    windows, t = [], 0.0
    for step in range(50):
        end = t + rng.uniform(0.5, 1.5)
        for _ in range(rng.randint(1, 8)):  # may start long before the window or end after it
            start = rng.uniform(max(0.0, t - 3.0), end)
            span = Span(rng.choice("xyz"), "rollout", start, rng.uniform(start, end + 1), 1, step)
            log.span(span)
            kept.span(span)
        windows.append((busy_by_worker(log.spans, t, end), busy_by_worker(kept.spans, t, end)))
        log.forget_spans(end)
        t = end
    assert all(a == b for a, b in windows)
    assert len(log.spans) < 10 < len(kept.spans)
    log.close()
    lines = (tmp_path / "spans.jsonl").read_text().splitlines()
    assert len(lines) == len(kept.spans) and json.loads(lines[0])["stage"] == "rollout"
