"""Chaos and resume: kill workers and the controller with SIGKILL mid-run; nothing is lost.

Exactly-once is checked from ``samples.jsonl``: every (step, group, sample) is trained once,
every step has its 64 samples, and a resumed run trains the same prompts per step as an
uninterrupted run of the same seed.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from asyncflow.config import load_config
from asyncflow.controller.controller import Controller

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

COMMON = ["eval.size=32", "eval.every=0", "checkpoint.every=1", "run.progress=false"]


def jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def n_steps(run_dir: Path) -> int:
    return sum(1 for x in jsonl(run_dir / "metrics.jsonl") if "event" not in x)


def check_exactly_once(run_dir: Path, steps: int) -> dict[int, list[int]]:
    samples = jsonl(run_dir / "samples.jsonl")
    keys = collections.Counter((s["step"], s["group"], s["sample"]) for s in samples)
    assert max(keys.values()) == 1, "a sample was trained twice"
    per_step = collections.Counter(s["step"] for s in samples)
    assert sorted(per_step) == list(range(steps)) and set(per_step.values()) == {64}
    prompts: dict[int, list[int]] = collections.defaultdict(list)
    for s in samples:
        prompts[s["step"]].append(s["index"])
    return {k: sorted(v) for k, v in prompts.items()}


async def wait_steps(
    run_dir: Path, n: int, timeout: float = 300, run: asyncio.Task[Any] | None = None
) -> None:
    """Wait for ``n`` step records; if the ``run`` ends first, fail with its error at once."""
    async with asyncio.timeout(timeout):
        while n_steps(run_dir) < n:  # polls a file another task writes
            if run is not None and run.done():
                run.result()  # raises what ended the run
                raise AssertionError(f"the run ended before step {n}")
            await asyncio.sleep(0.2)


async def test_killing_each_role_loses_nothing(tmp_path: Path) -> None:
    steps = 16
    cfg = load_config(
        None, [f"run.output_dir={tmp_path}", "run.name=chaos", f"algorithm.steps={steps}", *COMMON]
    )
    controller = Controller(cfg)
    run = asyncio.create_task(controller.run())
    rng = random.Random(7)
    killed = []
    try:
        for role, at in (("rollout", 2), ("reward", 6), ("actor", 10)):
            await wait_steps(cfg.run_dir, at + rng.randint(0, 2), run=run)
            handle = controller.workers[role][0]
            assert handle.proc is not None
            os.kill(handle.proc.pid, signal.SIGKILL)
            killed.append(handle.proc.pid)
        summary = await run
    finally:
        run.cancel()
    assert summary["steps"] >= steps
    events = jsonl(cfg.run_dir / "metrics.jsonl")
    died = [e["worker"] for e in events if e.get("event") == "worker_died"]
    replaced = [e["worker"] for e in events if e.get("event") == "worker_replaced"]
    assert died == ["rollout0", "reward0", "actor0"] and replaced == died
    check_exactly_once(cfg.run_dir, steps)


def controller_cmd(tmp: Path, name: str, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "asyncflow.controller",
        f"run.output_dir={tmp}",
        f"run.name={name}",
        f"algorithm.steps={steps}",
        *COMMON,
    ]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def poll(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_resume_after_controller_sigkill_trains_the_same_prompts(tmp_path: Path) -> None:
    steps = 12
    proc = subprocess.Popen(
        controller_cmd(tmp_path, "killed", steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    poll(lambda: n_steps(tmp_path / "killed") >= 5, 300)
    workers = children(proc.pid)
    assert len(workers) == 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    poll(lambda: not any(alive(p) for p in workers), 30)  # they die with their parent
    resume = subprocess.run(
        [sys.executable, "-m", "asyncflow.controller", "--resume", str(tmp_path / "killed")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resume.returncode == 0, resume.stderr[-2000:]
    resumed = check_exactly_once(tmp_path / "killed", steps)
    assert any(e.get("event") == "resumed" for e in jsonl(tmp_path / "killed/metrics.jsonl"))
    summary = json.loads((tmp_path / "killed/summary.json").read_text())
    assert summary["steps"] == steps  # redone steps are counted once
    plain = subprocess.run(
        controller_cmd(tmp_path, "plain", steps), capture_output=True, text=True, timeout=600
    )
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert resumed == check_exactly_once(tmp_path / "plain", steps)


def test_sigterm_stops_after_a_checkpointed_step_and_resume_continues_from_it(
    tmp_path: Path,
) -> None:
    """``docker stop`` sends SIGTERM: the run ends after the current step with a checkpoint of
    that step (the only one: periodic checkpoints are off), its final evaluation and summary,
    exit status 0 and no worker left; ``--resume`` continues from exactly that step."""
    run_dir = tmp_path / "term"
    cmd = [*controller_cmd(tmp_path, "term", 1000), "checkpoint.every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        poll(lambda: n_steps(run_dir) >= 3, 300)
        workers = children(proc.pid)
        assert len(workers) == 3
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: stopping after the current step" in err
    poll(lambda: not any(alive(p) for p in workers), 30)
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["stopped_early"] is True and 3 <= stopped < 1000
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved == [f"step_{stopped:06d}"]
    evals = [e for e in jsonl(run_dir / "metrics.jsonl") if e.get("event") == "eval"]
    assert evals[-1]["step"] == stopped
    check_exactly_once(run_dir, stopped)

    resume = subprocess.run(
        [
            sys.executable,
            "-m",
            "asyncflow.controller",
            "--resume",
            str(run_dir),
            f"algorithm.steps={stopped + 2}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resume.returncode == 0, resume.stderr[-2000:]
    events = jsonl(run_dir / "metrics.jsonl")
    assert [e["step"] for e in events if e.get("event") == "resumed"] == [stopped]
    check_exactly_once(run_dir, stopped + 2)
    assert "stopped_early" not in json.loads((run_dir / "summary.json").read_text())
