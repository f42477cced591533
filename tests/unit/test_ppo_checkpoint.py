"""PPO checkpoints hold the critic, and every restore of a critic loads the critic's own.

A step's checkpoint is the actor's folder ``checkpoints/step_N/`` with the critic in its
``critic/`` sub-folder (``controller_state.json`` still written last). ``--resume`` loads both;
the supervisor restores a replaced critic from ``critic/`` -- loading the actor's folder into it
overwrote its backbone with the LM weights and then failed on the missing value head.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from asyncflow.config import load_config
from asyncflow.controller.controller import Controller
from asyncflow.controller.supervisor import Supervisor
from asyncflow.runlog import RunLog
from asyncflow.transfer.index import SampleIndex


class Trainer:
    """A trainer worker: saves and loads ``trainer_state.json`` folders, reports its version."""

    def __init__(self, name: str, version: int = 0) -> None:
        self.name = name
        self.version = version

    async def get(self, path: str, *, timeout: float = 30.0) -> dict[str, Any]:
        assert path == "/v1/info"
        return {"policy_version": self.version}


def _write_trainer_folder(path: Path, version: int) -> None:
    # the controller's state is written last: no checkpoint looks whole before this
    assert not (path.parent / "controller_state.json").exists()
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": version}))


class Pipeline:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, int]] = []  # worker, op, path, its version
        self.loader = SimpleNamespace(position=0, state=lambda: {"position": 0})
        self.index: Any = None
        self.admitted_steps = self.version = self.trained_version = 0
        self.log = SimpleNamespace(samples_written=0)

    async def wait_ready(self, *handles: Any) -> None:
        return None

    async def call(self, worker: Trainer, op: str, batch: Any = None, params: Any = None) -> Any:
        path = Path(params["path"])
        self.calls.append((worker.name, op, str(path), worker.version))
        if op == "save":
            _write_trainer_folder(path, worker.version)
        elif op == "load":
            worker.version = json.loads((path / "trainer_state.json").read_text())["step"]
        return {"ok": True, "version": worker.version}


def _controller(tmp_path: Path, resume: bool = False) -> tuple[Controller, Pipeline]:
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "algorithm.name=ppo"])
    controller = Controller(cfg, resume=resume)
    pipe = Pipeline()
    controller.pipeline = pipe  # type: ignore[assignment]
    return controller, pipe


async def test_checkpoint_saves_the_critic_after_its_step_in_its_own_folder(
    tmp_path: Path,
) -> None:
    controller, pipe = _controller(tmp_path)
    actor, critic = Trainer("actor0", 3), Trainer("critic0", 2)  # its step 2 still running
    controller.workers = {"actor": [actor], "critic": [critic]}  # type: ignore[dict-item]

    async def critic_finishes() -> None:
        await asyncio.sleep(0.2)
        critic.version = 3

    finishing = asyncio.create_task(critic_finishes())
    await asyncio.wait_for(controller._checkpoint(3, 3, []), 10)
    await finishing
    step = controller._checkpoint_dir(3)
    assert pipe.calls == [
        ("actor0", "save", str(step), 3),
        ("critic0", "save", str(step / "critic"), 3),  # after its step 2 (version 3)
    ]
    assert (step / "controller_state.json").is_file()
    assert json.loads((step / "critic" / "trainer_state.json").read_text()) == {"step": 3}


async def _restore(controller: Controller, step: int) -> None:
    state = {
        "step": step,
        "version": step,
        "loader": {"position": 8},
        "admitted_steps": step + 1,
        "index": SampleIndex().snapshot(),
        "samples_before": 0,
        "samples_step": [],
        "path": "/elsewhere",
    }
    log = RunLog(controller.cfg.run_dir, mode="a")
    try:
        assert await controller._restore(state, log) == step
    finally:
        log.close()


async def test_resume_loads_the_critic_from_its_folder(tmp_path: Path) -> None:
    controller, pipe = _controller(tmp_path)
    actor, critic = Trainer("actor0", 2), Trainer("critic0", 2)
    controller.workers = {"actor": [actor], "critic": [critic]}  # type: ignore[dict-item]
    await controller._checkpoint(2, 2, [])

    resumed, pipe = _controller(tmp_path, resume=True)
    actor, critic = Trainer("actor0"), Trainer("critic0")  # fresh workers
    resumed.workers = {"actor": [actor], "critic": [critic]}  # type: ignore[dict-item]
    await _restore(resumed, 2)
    step = resumed._checkpoint_dir(2)
    assert pipe.calls == [
        ("actor0", "load", str(step), 0),
        ("critic0", "load", str(step / "critic"), 0),
    ]
    assert critic.version == 2


async def test_resume_from_a_checkpoint_without_critic_says_so_and_keeps_saving(
    tmp_path: Path,
) -> None:
    """A checkpoint written before critics were saved: the critic starts afresh, loudly; its
    version then counts fewer steps than the actor's, and later checkpoints still save it."""
    controller, pipe = _controller(tmp_path)
    controller.workers = {"actor": [Trainer("actor0", 2)]}  # type: ignore[dict-item]
    await controller._checkpoint(2, 2, [])  # as the old code did: the actor alone

    resumed, pipe = _controller(tmp_path, resume=True)
    critic = Trainer("critic0")
    resumed.workers = {"actor": [Trainer("actor0")], "critic": [critic]}  # type: ignore[dict-item]
    await _restore(resumed, 2)
    events = [
        json.loads(line)
        for line in (resumed.cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert "critic_not_restored" in {e.get("event") for e in events}
    critic.version = 1  # one step trained after the resume: the actor is at version 3
    await asyncio.wait_for(resumed._checkpoint(3, 3, []), 10)
    assert pipe.calls[-1] == ("critic0", "save", str(resumed._checkpoint_dir(3) / "critic"), 1)


async def test_a_replaced_critic_loads_the_critics_checkpoint(tmp_path: Path) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    async def call(worker: Any, op: str, params: dict[str, Any]) -> dict[str, Any]:
        calls.append((op, params))
        return {}

    async def never(*_: Any) -> Any:
        raise AssertionError("not called")

    folder = tmp_path / "step_000004"
    for sub in (folder, folder / "critic"):
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "trainer_state.json").write_text("{}")
    pipeline = SimpleNamespace(version=4, trained_version=4, call=call)
    sup = Supervisor(pipeline, never, never, tmp_path, 1.0, 1.0)  # type: ignore[arg-type]
    await sup._restore_trainer(SimpleNamespace(name="critic0"), "critic")  # type: ignore[arg-type]
    await sup._restore_trainer(SimpleNamespace(name="actor0"), "actor")  # type: ignore[arg-type]
    assert calls == [
        ("load", {"path": str(folder / "critic")}),
        ("load", {"path": str(folder)}),
    ]
    (folder / "critic" / "trainer_state.json").unlink()
    with pytest.raises(RuntimeError, match=r"no critic checkpoint"):
        await sup._restore_trainer(SimpleNamespace(name="critic0"), "critic")  # type: ignore[arg-type]
