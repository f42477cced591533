"""Start-up of the workers: a run cancelled while some workers are still starting stops the
ones that did start; the first worker that fails to start fails the start at once, with the end
of its log in the error."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from asyncflow.config import Config, load_config
from asyncflow.controller.controller import Controller
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.pool import WorkerError, WorkerHandle, spawn_worker

STOPPED: list[str] = []  #: names of the Recorded handles stopped


class Recorded(WorkerHandle):
    async def stop(self, grace: float = 10.0) -> None:
        STOPPED.append(self.name)


def scripted_fleet(ready: asyncio.Event, fail: bool = False) -> Any:
    """A fleet whose reward worker starts at once, whose other workers are still starting
    (or, with ``fail``, whose actor then fails to start)."""

    class ScriptedFleet(Fleet):
        async def spawn(self, role: str, i: int, generation: int) -> WorkerHandle:
            if role == "reward":
                ready.set()
                return Recorded(f"{role}{i}", role, "http://127.0.0.1:9", f"{role}{i}", "t")
            if fail and role == "actor":
                await ready.wait()
                raise WorkerError(f"{role}{i}", "exited with code 1 before it was ready")
            await asyncio.Event().wait()  # still starting (a vLLM engine takes a minute)
            raise AssertionError("unreachable")

    def make(cfg: Config) -> Fleet:
        return ScriptedFleet(cfg)

    return make


async def test_cancelled_during_startup_stops_the_workers_that_started(tmp_path: Path) -> None:
    ready = asyncio.Event()
    STOPPED.clear()
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.progress=false"])
    controller = Controller(cfg, fleet=scripted_fleet(ready))
    task = asyncio.create_task(controller.run())
    await asyncio.wait_for(ready.wait(), 30)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert STOPPED == ["reward0"]  # it had started: stopped, not left running


async def test_one_worker_failing_to_start_fails_the_start_at_once(tmp_path: Path) -> None:
    ready = asyncio.Event()
    STOPPED.clear()
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.progress=false"])
    controller = Controller(cfg, fleet=scripted_fleet(ready, fail=True))
    with pytest.raises(WorkerError, match="actor0: exited with code 1"):
        # the rollout worker never finishes starting: without failing fast this would wait
        await asyncio.wait_for(controller.run(), 30)
    assert STOPPED == ["reward0"]


async def test_a_worker_that_dies_while_starting_shows_the_end_of_its_log(
    tmp_path: Path,
) -> None:
    settings = {"data": {"source": str(tmp_path / "missing.jsonl")}}
    with pytest.raises(WorkerError) as e:
        await spawn_worker(
            "reward", "reward0", "t", settings, log_dir=tmp_path / "logs", start_timeout=120
        )
    text = str(e.value)
    assert "exited with code" in text and str(tmp_path / "logs" / "reward0.log") in text
    assert "missing.jsonl" in text  # the worker's own reason, from its log


@pytest.mark.parametrize(
    ("override", "key", "reason"),
    [
        ("data.source={tmp}/missing.jsonl", "data.source", "missing.jsonl"),
        ("model.path={tmp}/no-model", "model.path", "not a transformers folder"),
        ("reward.function=builtin:nope", "reward.function", "unknown built-in reward"),
        ("eval.source={tmp}/missing-eval.jsonl", "eval.source", "missing-eval.jsonl"),
    ],
)
def test_bad_input_fails_before_any_worker_starts_or_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, key: str, reason: str
) -> None:
    """The controller checks the model, the reward's name and both prompt sets itself: a
    mistake is one line naming the key (exit 2), at once, instead of a worker dying in its log
    a minute into a vLLM start."""
    from asyncflow.controller.__main__ import main

    out = tmp_path / "runs"
    rc = main([f"run.output_dir={out}", override.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {key}: " in err and reason in err, err
    assert not out.exists()  # no run directory, no worker log: nothing started
