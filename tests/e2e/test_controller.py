"""End-to-end: the controller trains the tiny model with real workers (vLLM CPU build, PyTorch).

Assertions read the structured outputs (metrics.jsonl, samples.jsonl, spans.jsonl), never logs.
Each configuration runs once per module and several tests read its outputs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop

from asyncflow.config import load_config
from asyncflow.controller.controller import Controller
from asyncflow.controller.exporter import NAMES

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

STEPS = 300


def run(tmp: Path, name: str, *overrides: str) -> Path:
    cfg = load_config(
        None, [f"run.output_dir={tmp}", f"run.name={name}", "run.progress=false", *overrides]
    )
    uvloop.run(Controller(cfg).run())
    return cfg.run_dir


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def evals(run_dir: Path) -> list[float]:
    return [x["eval_accuracy"] for x in jsonl(run_dir / "metrics.jsonl") if x.get("event")]


def steps(run_dir: Path) -> list[dict[str, Any]]:
    return [x for x in jsonl(run_dir / "metrics.jsonl") if "event" not in x]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    common = [f"algorithm.steps={STEPS}", "eval.every=100", "run.seed=0"]
    return {
        "async": run(tmp, "async", *common),
        "sync": run(tmp, "sync", *common, "algorithm.staleness=0", "algorithm.streaming=false"),
        "k2": run(
            tmp, "k2", "algorithm.steps=12", "eval.every=0", "eval.size=32", "algorithm.staleness=2"
        ),
    }


def test_default_grpo_raises_heldout_accuracy(runs: dict[str, Path]) -> None:
    acc = evals(runs["async"])
    assert len(acc) == 1 + STEPS // 100
    assert acc[-1] >= acc[0] + 0.05, f"held-out accuracy did not rise: {acc}"
    summary = json.loads((runs["async"] / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["reward_failures"] == 0
    # the training reward rises too (means over the first and last tenth of the steps)
    assert summary["reward_last"] > summary["reward_first"], summary
    # every step's record, in order, with the weight sync that followed it broken down
    records = steps(runs["async"])
    assert [r["step"] for r in records] == list(range(STEPS))
    for r in records:
        assert r["version"] == r["step"] + 1
        parts = r["sync_send_s"], r["sync_recv_s"], r["sync_reload_s"]
        assert all(0 <= x <= r["sync_s"] + 1e-6 for x in parts)
        assert r["sync_reload_s"] > 0
    # groups whose samples all got the same reward are not trained on (exact: zero gradient);
    # on this task that is some of the groups, never all of them over a run
    frac = [r.get("trained_rows_frac", 1.0) for r in records]
    assert all(0.0 <= f <= 1.0 for f in frac) and 0.0 < sum(frac) / len(frac) < 1.0, frac


@pytest.mark.parametrize("name, k", [("sync", 0), ("async", 1), ("k2", 2)])
def test_no_trained_sample_exceeds_the_staleness_bound(
    runs: dict[str, Path], name: str, k: int
) -> None:
    samples = jsonl(runs[name] / "samples.jsonl")
    n_steps = len(steps(runs[name]))
    assert len(samples) == n_steps * 64
    lags = [s["step"] - s["version"] for s in samples]
    assert min(lags) >= 0 and max(lags) <= k
    if k > 0:  # the bound is used, not just respected
        assert max(lags) == k
    # exactly once: every (step, group, sample) is trained once, 8 whole groups per step
    keys = {(s["step"], s["group"], s["sample"]) for s in samples}
    assert len(keys) == len(samples)
    for st in range(n_steps):
        groups = {s["group"] for s in samples if s["step"] == st}
        assert len(groups) == 8


def overlap(run_dir: Path) -> float:
    spans = jsonl(run_dir / "spans.jsonl")
    roll = [(s["start"], s["end"]) for s in spans if s["stage"] == "rollout"]
    train = [(s["start"], s["end"]) for s in spans if s["stage"] == "train"]
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in roll for c, d in train)


def test_rollout_and_training_overlap_only_when_asynchronous(runs: dict[str, Path]) -> None:
    assert overlap(runs["async"]) > 1.0  # seconds of rollout running while training runs
    assert overlap(runs["k2"]) > 0.0
    assert overlap(runs["sync"]) == 0.0


def test_sync_and_async_reach_comparable_accuracy(runs: dict[str, Path]) -> None:
    a, s = evals(runs["async"])[-1], evals(runs["sync"])[-1]
    assert abs(a - s) <= 0.08, f"async {a:.3f} vs sync {s:.3f}"
    assert s > evals(runs["sync"])[0]


def test_ppo_completes_and_the_critic_learns(tmp_path: Path) -> None:
    run_dir = run(
        tmp_path,
        "ppo",
        "algorithm.name=ppo",
        "algorithm.steps=30",
        "algorithm.prompts_per_step=16",
        "algorithm.samples_per_prompt=4",
        "algorithm.micro_batch_groups=4",
        "eval.every=0",
        "eval.size=64",
    )
    losses = [s["value_loss"] for s in steps(run_dir)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"value loss did not fall: {first:.4f} -> {last:.4f}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split()[2] != "Z"


async def scrape_when_trained(run_dir: Path) -> str:
    """The /metrics text once the run has finished a step."""
    async with asyncio.timeout(300):
        while not (run_dir / "metrics_url").exists() or not steps(run_dir):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        url = (run_dir / "metrics_url").read_text().strip()
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            assert r.status == 200
            return await r.text()


async def test_embedded_in_a_running_loop_serves_metrics_and_leaves_no_worker(
    tmp_path: Path,
) -> None:
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=embed",
            "run.progress=false",
            "algorithm.steps=4",
            "eval.size=16",
            "rollout.engine=transformers",
        ],
    )
    controller = Controller(cfg)
    scrape = asyncio.create_task(scrape_when_trained(cfg.run_dir))
    summary = await controller.run()  # pytest-asyncio's loop is already running
    text = await scrape
    assert summary["steps"] == 4
    for name in NAMES:
        assert f"\n{name}" in "\n" + text, name
    assert 'asyncflow_worker_idle_fraction{worker="rollout0"}' in text
    pids = [h.proc.pid for hs in controller.workers.values() for h in hs if h.proc]
    assert len(pids) == 3 and not any(alive(p) for p in pids)
    report = cfg.run_dir / "report"
    trace = json.loads((report / "trace.json").read_text())
    assert trace["traceEvents"]
    assert sorted(p.name for p in report.glob("*.png"))
    assert all(p.stat().st_size > 1000 for p in report.glob("*.png"))


async def test_cancelled_run_leaves_no_worker(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=cancel",
            "run.progress=false",
            "algorithm.steps=1000",
            "eval.size=16",
            "rollout.engine=transformers",
        ],
    )
    controller = Controller(cfg)
    task = asyncio.create_task(controller.run())
    while not (cfg.run_dir / "metrics.jsonl").exists() or not steps(cfg.run_dir):  # noqa: ASYNC110
        await asyncio.sleep(0.2)  # waiting on files another task writes
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pids = [h.proc.pid for hs in controller.workers.values() for h in hs if h.proc]
    assert pids and not any(alive(p) for p in pids)


@pytest.mark.parametrize("k", [1, 0])
async def test_odd_prompts_per_step_streams_to_the_end(tmp_path: Path, k: int) -> None:
    """3 prompts per step with 2-group micro-batches: the last batch of a step is one group.
    Stages used to wait for a full batch: the run hung on its last step (k = 1), or on its
    first (k = 0 with streaming, where the next step's rows never come)."""
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            f"run.name=odd{k}",
            "run.progress=false",
            "algorithm.steps=3",
            "algorithm.prompts_per_step=3",
            f"algorithm.staleness={k}",
            "algorithm.streaming=true",
            "eval.every=0",
            "eval.size=8",
            "rollout.engine=transformers",
        ],
    )
    summary = await asyncio.wait_for(Controller(cfg).run(), 240)
    assert summary["steps"] == 3
    assert [s["samples"] for s in steps(cfg.run_dir)] == [24, 24, 24]


FLAKY_REWARD = """
from asyncflow.rewards.math import arithmetic_reward


def flaky(prompt, response, answer):
    if len(response) % 3 == 1:
        raise ValueError(f"cannot parse {response!r}")
    return arithmetic_reward(prompt, response, answer)
"""


@pytest.mark.parametrize("policy", ["zero", "regenerate"])
async def test_a_raising_reward_function_is_reported_and_loses_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    policy: str,
) -> None:
    """A user reward function that raises on about a third of the responses: every step still
    trains its full batch, each failure is recorded with the function's own message (the step
    record, a ``reward_failure`` event, a warning on stderr) and handled per
    ``reward.on_failure``: scored 0, or its group generated again."""
    (tmp_path / "flaky_rewards.py").write_text(FLAKY_REWARD)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            f"run.name=flaky-{policy}",
            "run.progress=false",
            "algorithm.steps=3",
            "eval.every=0",
            "eval.size=8",
            "rollout.engine=transformers",
            "reward.function=flaky_rewards:flaky",
            f"reward.on_failure={policy}",
        ],
    )
    summary = await asyncio.wait_for(Controller(cfg).run(), 300)
    per_step = cfg.algorithm.prompts_per_step * cfg.algorithm.samples_per_prompt
    assert summary["steps"] == 3
    assert [s["samples"] for s in steps(cfg.run_dir)] == [per_step] * 3
    lines = jsonl(cfg.run_dir / "metrics.jsonl")
    failures = [x for x in lines if x.get("event") == "reward_failure"]
    assert failures and summary["reward_failures"] == sum(len(f["rows"]) for f in failures)
    assert all(e.startswith("ValueError: cannot parse") for f in failures for e in f["errors"])
    assert any(s.get("reward_errors") for s in steps(cfg.run_dir))
    assert "warning: the reward function failed on a sample (ValueError: cannot parse" in (
        capfd.readouterr().err
    )
    trained = jsonl(cfg.run_dir / "samples.jsonl")
    assert len(trained) == 3 * per_step and len({t["row"] for t in trained}) == 3 * per_step
    regenerated = [x for x in lines if x.get("event") == "regenerate"]
    if policy == "zero":
        failed_rows = {r for f in failures for r in f["rows"]}
        assert not regenerated
        assert all(t["reward"] == 0.0 for t in trained if t["row"] in failed_rows)
    else:
        assert regenerated


def test_a_second_sigterm_stops_at_once_and_leaves_no_worker(tmp_path: Path) -> None:
    """The CLI: the first SIGTERM asks for a stop after the step, a second one cancels the run
    (exit status 143); either way no worker is left."""
    cmd = [
        sys.executable,
        "-m",
        "asyncflow.controller",
        f"run.output_dir={tmp_path}",
        "run.name=term2",
        "algorithm.steps=1000",
        "eval.size=16",
        "eval.every=0",
        "rollout.engine=transformers",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    run_dir = tmp_path / "term2"
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists() or not steps(run_dir):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        workers = [int(x) for x in out.stdout.split()]
        assert len(workers) == 3
        proc.send_signal(signal.SIGTERM)
        seen = []
        while not any("SIGTERM: stopping after the current step" in x for x in seen):
            line = proc.stderr.readline()  # the run is still finishing its step after this
            assert line, "".join(seen)[-2000:]
            seen.append(line)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "second SIGTERM: stopping now" in err
    deadline = time.monotonic() + 30
    while any(alive(p) for p in workers):
        assert time.monotonic() < deadline, "a worker outlived the controller"
        time.sleep(0.2)


def test_data_parallel_actor_checkpoints_and_resumes(tmp_path: Path) -> None:
    """actor.workers=2: both ranks train, take part in every checkpoint (rank 0 writes, rank 1
    waits at its barrier: asked of rank 0 alone, the save hung) and resume from it."""
    common = [
        f"run.output_dir={tmp_path}",
        "run.name=dp",
        "run.progress=false",
        "actor.workers=2",
        "rollout.engine=transformers",
        "eval.size=16",
        "eval.every=0",
        "checkpoint.every=1",
    ]
    first = uvloop.run(Controller(load_config(None, [*common, "algorithm.steps=2"])).run())
    assert first["steps"] == 2
    run_dir = tmp_path / "dp"
    assert (run_dir / "checkpoints" / "step_000002" / "model.safetensors").is_file()
    cfg = load_config(run_dir / "config.json", [*common, "algorithm.steps=3"])
    again = uvloop.run(Controller(cfg, resume=True).run())
    assert again["steps"] == 3
    trained = jsonl(run_dir / "samples.jsonl")
    assert sorted({x["step"] for x in trained}) == [0, 1, 2]
    assert len(trained) == 3 * 64  # each step's samples once, across the resume
    resumed = [x for x in jsonl(run_dir / "metrics.jsonl") if x.get("event") == "resumed"]
    assert [x["version"] for x in resumed] == [2]
