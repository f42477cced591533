"""asyncflow.report on a small synthetic run directory (and on a real one when present)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

import asyncflow.report
from asyncflow.report import write_report
from asyncflow.report.idle import idle_table, measure, merge
from asyncflow.report.run import load_run, training_window
from asyncflow.report.tensorboard import TensorBoardWriter, numeric_scalars
from asyncflow.report.trace import trace_events

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("gantt", "curves", "throughput", "staleness")


def _span(worker: str, stage: str, start: float, end: float, step: int, version: int = -1) -> dict:
    return {"worker": worker, "stage": stage, "start": start, "end": end, "rows": 8,
            "version": version, "step": step}  # fmt: skip


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def make_run(root: Path, steps: int = 6) -> Path:
    """A 1-second-per-step run: rollout0 runs 3 overlapping requests, reward0 scores, actor0
    trains, then a sync on rollout0 and actor0. Step k covers [1 + k, 2 + k)."""
    run = root / "run"
    run.mkdir()
    spans, metrics, samples = [], [], []
    metrics.append({"event": "eval", "step": 0, "eval_accuracy": 0.25})
    for k in range(steps):
        t = 1.0 + k
        spans += [
            _span("rollout0", "rollout", t + 0.05 * i, t + 0.4 + 0.05 * i, k, k) for i in range(3)
        ]
        spans += [
            _span("reward0", "reward", t + 0.5, t + 0.55, k),
            _span("actor0", "train", t + 0.5, t + 0.8, k),
        ]
        spans += [_span("actor0", "train", t + 0.55, t + 0.7, k)]  # overlaps the other train span
        spans += [_span(w, "sync", t + 0.8, t + 0.9, -1, k + 1) for w in ("rollout0", "actor0")]
        metrics.append({"step": k, "version": k + 1, "time_s": t + 1.0, "step_time_s": 1.0,
                        "reward_mean": 0.1 * k, "accuracy": 0.05 * k, "samples": 24,
                        "response_tokens": 240, "samples_per_s": 24.0 - k, "tokens_per_s": 240.0,
                        "idle_frac": {"rollout0": 0.5}})  # fmt: skip
        samples += [{"step": k, "version": max(k - (i % 2), 0), "reward": 1.0} for i in range(24)]
    metrics.append({"event": "eval", "step": steps, "eval_accuracy": 0.5})
    _write_jsonl(run / "spans.jsonl", spans)
    _write_jsonl(run / "metrics.jsonl", metrics)
    _write_jsonl(run / "samples.jsonl", samples)
    (run / "config.json").write_text(json.dumps({"run": {"name": "synthetic"}}), encoding="utf-8")
    return run


def _check_trace(trace_path: Path, workers: set[str]) -> None:
    doc = json.loads(trace_path.read_text(encoding="utf-8"))
    events = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    by_tid: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["tid"] in names
            if names[e["tid"]].split("/")[0] in workers:
                assert {"stage", "rows", "version", "step"} <= e["args"].keys()
            by_tid[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for tid, iv in by_tid.items():
        iv.sort()
        for (_, end), (start, _) in pairwise(iv):
            assert end <= start, f"overlap on track {names[tid]}"
    for w in workers:
        assert w in names.values(), f"no track for {w}"
        for tid, name in names.items():
            if name.split("/")[0] == w:
                assert by_tid[tid], f"empty track {name}"


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1024


def test_write_report_synthetic(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    written = write_report(run_dir)
    assert {"trace", "idle_md", "idle_json", *PLOTS} <= written.keys()
    assert all(p.parent == run_dir / "report" and p.exists() for p in written.values())
    _check_trace(written["trace"], {"rollout0", "reward0", "actor0"})
    for name in PLOTS:
        _check_png(written[name])


def test_trace_subtracks_for_concurrent_requests(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path))
    names = [e["args"]["name"] for e in trace_events(run) if e.get("name") == "thread_name"]
    assert [n for n in names if n.startswith("rollout0")] == [
        "rollout0",
        "rollout0/1",
        "rollout0/2",
    ]
    assert [n for n in names if n.startswith("actor0")] == ["actor0", "actor0/1"]
    assert "weight sync" in names and "steps" in names
    syncs = [
        e for e in trace_events(run) if e.get("ph") == "X" and e["args"].get("stage") == "sync"
    ]
    assert len(syncs) == 6 * 3  # two workers' sync spans plus one deduplicated per step


def test_idle_table_adds_up_to_window(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path))
    lo, hi = training_window(run)
    assert (lo, hi) == pytest.approx((1.0, 7.0))
    rows = {r.worker: r for r in idle_table(run)}
    for r in rows.values():
        assert r.busy_s + r.waiting_data_s + r.waiting_weights_s == pytest.approx(hi - lo)
        assert r.idle_frac == pytest.approx(1 - r.busy_s / (hi - lo))
    # rollout0: 3 overlapping requests [t, t+0.5) -> 0.5 s busy per step, syncs 0.1 s.
    assert rows["rollout0"].busy_s == pytest.approx(6 * 0.5)
    assert rows["rollout0"].waiting_weights_s == pytest.approx(6 * 0.1)
    assert rows["actor0"].busy_s == pytest.approx(6 * 0.3)
    assert rows["reward0"].waiting_weights_s == 0.0
    saved = json.loads((write_report(run.dir, plots=False)["idle_json"]).read_text())
    assert saved["window"]["length_s"] == pytest.approx(6.0)


def test_intervals_union() -> None:
    assert merge([(3, 4), (0, 1), (0.5, 2), (2, 2.5), (5, 5)]) == [(0, 2.5), (3, 4)]
    assert measure([(0, 1), (0, 1), (0.5, 1.5)]) == pytest.approx(1.5)


def test_gantt_steps_choice(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from asyncflow.report.plots import gantt_steps

    run = load_run(make_run(tmp_path, steps=7))
    assert gantt_steps(run) == [2, 3, 4]
    assert gantt_steps(run, 1) == [3]


def test_report_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, mod, None)  # importing it raises ImportError
    monkeypatch.delitem(sys.modules, "asyncflow.report.plots", raising=False)
    monkeypatch.delattr(asyncflow.report, "plots", raising=False)
    written = write_report(make_run(tmp_path))
    assert set(written) == {"trace", "idle_md", "idle_json"}


def test_report_on_partial_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    (run_dir / "spans.jsonl").write_text(json.dumps(_span("w", "rollout", 0, 1, 0)) + "\n{trunc")
    written = write_report(run_dir)
    assert "trace" in written and "curves" not in written
    with pytest.raises(ValueError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_tensorboard_scalars(tmp_path: Path) -> None:
    rec = {"step": 3, "loss": 0.5, "ok": True, "name": "x", "idle_frac": {"a": 0.25},
           "nan": float("nan")}  # fmt: skip
    assert numeric_scalars(rec) == {"loss": 0.5, "idle_frac/a": 0.25}
    assert numeric_scalars({"event": "eval", "eval_accuracy": 1}) == {"eval/eval_accuracy": 1.0}
    with TensorBoardWriter(tmp_path) as tb:
        tb.scalars(3, rec)  # a no-op without tensorboard
    if tb.log_dir.exists():
        assert any(tb.log_dir.iterdir())


@pytest.mark.parametrize("name", ["learn300", "bench/bench-sync"])
def test_real_run_if_present(tmp_path: Path, name: str) -> None:
    src = Path(__file__).resolve().parents[2] / "runs" / name
    if not (src / "spans.jsonl").exists():
        pytest.skip(f"no real run at {src}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for f in ("spans.jsonl", "metrics.jsonl", "samples.jsonl", "config.json"):
        if (src / f).exists():
            (run_dir / f).write_bytes((src / f).read_bytes())
    written = write_report(run_dir, plots=False)
    run = load_run(run_dir)
    _check_trace(written["trace"], {s.worker for s in run.spans})
    lo, hi = training_window(run)
    for r in idle_table(run):
        assert r.busy_s + r.waiting_data_s + r.waiting_weights_s == pytest.approx(hi - lo)
