"""Which checkpoint a replaced trainer loads (:meth:`Checkpoints.load_trainer`, which the
supervisor calls for every trainer it replaces).

While step s's weight sync runs in the background, the actor is already at version s + 1 (its
step is committed and checkpointed) but the rollout engines still serve s. A trainer replaced
in that window must load step s + 1's checkpoint: loading s would lose step s's update and make
the pending sync report the wrong version (the chaos test once failed exactly so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncflow.config import load_config
from asyncflow.controller.checkpoints import Checkpoints
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.loader import PromptLoader
from asyncflow.controller.stages import Admission
from asyncflow.controller.sync import Versions
from asyncflow.runlog import RunLog
from asyncflow.transfer.index import SampleIndex


class FakeTrainer:
    """A replaced trainer's handle: records the ops asked of it."""

    def __init__(self, name: str) -> None:
        self.name = self.unit = name
        self.url = f"http://{name}"
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.calls.append((path.removeprefix("/v1/work/"), body["params"]))
        return {"ok": True, "version": 0}  # a load's answer


def _checkpoints(tmp_path: Path, served: int, trained: int) -> Checkpoints:
    """The run's checkpoints while step ``trained - 1``'s sync runs: the rollout engines
    still serve ``served``, the actor is at ``trained`` (committed and checkpointed)."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r"])
    versions = Versions(served)
    versions.trained = trained
    index = SampleIndex()
    admission = Admission(cfg, index, PromptLoader(1, 0), versions)
    log = RunLog(cfg.run_dir)
    log.close()
    return Checkpoints(cfg.run_dir, 2, Fleet(cfg), log, versions, admission, index)


def _checkpoint(checkpoints: Checkpoints, version: int) -> None:
    path = checkpoints.dir(version)
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")


async def test_replaced_trainer_loads_last_committed_version(tmp_path: Path) -> None:
    checkpoints = _checkpoints(tmp_path, served=3, trained=4)
    for v in (3, 4):
        _checkpoint(checkpoints, v)
    actor = FakeTrainer("actor0")
    await checkpoints.load_trainer(actor, "actor")
    assert actor.calls == [("load", {"path": str(checkpoints.dir(4))})]


async def test_missing_checkpoint_fails_with_advice(tmp_path: Path) -> None:
    checkpoints = _checkpoints(tmp_path, served=3, trained=4)
    _checkpoint(checkpoints, 3)
    with pytest.raises(RuntimeError, match=r"checkpoint\.every=1"):
        await checkpoints.load_trainer(FakeTrainer("actor0"), "actor")
