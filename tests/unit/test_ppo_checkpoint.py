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
from typing import Any

import pytest

from asyncflow.config import Config, load_config
from asyncflow.controller.checkpoints import Checkpoints
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.loader import PromptLoader
from asyncflow.controller.stages import Admission
from asyncflow.controller.sync import Versions
from asyncflow.runlog import RunLog
from asyncflow.transfer.index import SampleIndex

Calls = list[tuple[str, str, str, int]]  # worker, op, path, its version


class FakeTrainer:
    """A trainer worker's handle: saves and loads ``trainer_state.json`` folders, reports its
    version, and records each op (with its version when asked) in ``calls``."""

    def __init__(self, name: str, calls: Calls, version: int = 0) -> None:
        self.name = self.unit = name
        self.url = f"http://{name}"
        self.calls = calls
        self.version = version

    async def get(self, path: str, *, timeout: float = 30.0) -> dict[str, Any]:
        assert path == "/v1/info"
        return {"policy_version": self.version}

    async def call(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        op = path.removeprefix("/v1/work/")
        folder = Path(body["params"]["path"])
        self.calls.append((self.name, op, str(folder), self.version))
        if op == "save":
            _write_trainer_folder(folder, self.version)
        elif op == "load":
            self.version = json.loads((folder / "trainer_state.json").read_text())["step"]
        return {"ok": True, "version": self.version}


def _write_trainer_folder(path: Path, version: int) -> None:
    # the controller's state is written last: no checkpoint looks whole before this
    assert not (path.parent / "controller_state.json").exists()
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": version}))


def _cfg(tmp_path: Path) -> Config:
    return load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "algorithm.name=ppo"])


def _checkpoints(
    cfg: Config, workers: dict[str, list[Any]], log: RunLog, version: int = 0
) -> Checkpoints:
    versions = Versions(version)
    index = SampleIndex()
    admission = Admission(cfg, index, PromptLoader(100, cfg.run.seed), versions)
    fleet = Fleet(cfg, workers)
    return Checkpoints(cfg.run_dir, cfg.checkpoint.keep, fleet, log, versions, admission, index)


async def test_checkpoint_saves_the_critic_after_its_step_in_its_own_folder(
    tmp_path: Path,
) -> None:
    cfg, calls = _cfg(tmp_path), []
    actor, critic = FakeTrainer("actor0", calls, 3), FakeTrainer("critic0", calls, 2)
    log = RunLog(cfg.run_dir)  # critic0: its step 2 still running
    checkpoints = _checkpoints(cfg, {"actor": [actor], "critic": [critic]}, log)

    async def critic_finishes() -> None:
        await asyncio.sleep(0.2)
        critic.version = 3

    finishing = asyncio.create_task(critic_finishes())
    await asyncio.wait_for(checkpoints.save(3, 3, []), 10)
    await finishing
    log.close()
    step = checkpoints.dir(3)
    assert calls == [
        ("actor0", "save", str(step), 3),
        ("critic0", "save", str(step / "critic"), 3),  # after its step 2 (version 3)
    ]
    assert (step / "controller_state.json").is_file()
    assert json.loads((step / "critic" / "trainer_state.json").read_text()) == {"step": 3}


def _state(step: int) -> dict[str, Any]:
    return {
        "step": step,
        "version": step,
        "loader": {"position": 8},
        "admitted_steps": step + 1,
        "index": SampleIndex().snapshot(),
        "samples_before": 0,
        "samples_step": [],
        "path": "/elsewhere",
    }


async def test_resume_loads_the_critic_from_its_folder(tmp_path: Path) -> None:
    cfg, calls = _cfg(tmp_path), []
    log = RunLog(cfg.run_dir)
    workers = {
        "actor": [FakeTrainer("actor0", calls, 2)],
        "critic": [FakeTrainer("critic0", calls, 2)],
    }
    await _checkpoints(cfg, workers, log).save(2, 2, [])
    log.close()

    calls.clear()
    actor, critic = FakeTrainer("actor0", calls), FakeTrainer("critic0", calls)  # fresh workers
    log = RunLog(cfg.run_dir, mode="a")
    resumed = _checkpoints(cfg, {"actor": [actor], "critic": [critic]}, log)
    try:
        assert await resumed.restore(_state(2)) == 2
    finally:
        log.close()
    step = resumed.dir(2)
    assert calls == [
        ("actor0", "load", str(step), 0),
        ("critic0", "load", str(step / "critic"), 0),
    ]
    assert critic.version == 2


async def test_resume_from_a_checkpoint_without_critic_says_so_and_keeps_saving(
    tmp_path: Path,
) -> None:
    """A checkpoint written before critics were saved: the critic starts afresh, loudly; its
    version then counts fewer steps than the actor's, and later checkpoints still save it."""
    cfg, calls = _cfg(tmp_path), []
    log = RunLog(cfg.run_dir)
    old = _checkpoints(cfg, {"actor": [FakeTrainer("actor0", calls, 2)]}, log)
    await old.save(2, 2, [])  # as the old code did: the actor alone
    log.close()

    critic = FakeTrainer("critic0", calls)
    log = RunLog(cfg.run_dir, mode="a")
    resumed = _checkpoints(cfg, {"actor": [FakeTrainer("actor0", calls)], "critic": [critic]}, log)
    try:
        assert await resumed.restore(_state(2)) == 2
        events = [
            json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        assert "critic_not_restored" in {e.get("event") for e in events}
        critic.version = 1  # one step trained after the resume: the actor is at version 3
        await asyncio.wait_for(resumed.save(3, 3, []), 10)
    finally:
        log.close()
    assert calls[-1] == ("critic0", "save", str(resumed.dir(3) / "critic"), 1)


class RecordingTrainer:
    """A replaced trainer's handle: records the ops asked of it."""

    def __init__(self, name: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
        self.name = self.unit = name
        self.url = f"http://{name}"
        self.calls = calls

    async def call(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.calls.append((path.removeprefix("/v1/work/"), body["params"]))
        return {"ok": True, "version": 0}  # a load's answer


async def test_a_replaced_critic_loads_the_critics_checkpoint(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    calls: list[tuple[str, dict[str, Any]]] = []
    log = RunLog(cfg.run_dir)
    checkpoints = _checkpoints(cfg, {}, log, version=4)
    log.close()
    folder = checkpoints.dir(4)
    for sub in (folder, folder / "critic"):
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "trainer_state.json").write_text("{}")
    await checkpoints.load_trainer(RecordingTrainer("critic0", calls), "critic")
    await checkpoints.load_trainer(RecordingTrainer("actor0", calls), "actor")
    assert calls == [
        ("load", {"path": str(folder / "critic")}),
        ("load", {"path": str(folder)}),
    ]
    (folder / "critic" / "trainer_state.json").unlink()
    with pytest.raises(RuntimeError, match=r"no critic checkpoint"):
        await checkpoints.load_trainer(RecordingTrainer("critic0", calls), "critic")
