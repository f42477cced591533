"""Stage calls, a training step and the weight sync against scripted workers: rows released by
their last consumer, a step's commit retried on its own, a held-up sync's newer weights.

A stage call whose rows are released by its own completion (it was their last consumer).

Seen in the chaos test: the reward worker died while the trainer held a step's rows; lineage
sent those rows back to the reward stage (their advantages were lost), the trainer then
committed the step, and the re-scoring call was the rows' last consumer -- complete() released
them, and noting their rewards in the released rows' metadata raised KeyError, which ended the
stage loop and the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncflow.config import Config, load_config
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.pool import WorkerError
from asyncflow.controller.progress import Progress
from asyncflow.controller.records import StepRecords
from asyncflow.controller.retry import Retry
from asyncflow.controller.stages import Stages, register_tasks, stage_specs
from asyncflow.controller.step import Steps
from asyncflow.controller.sync import Versions, WeightSync
from asyncflow.controller.training import Training
from asyncflow.runlog import RunLog
from asyncflow.transfer.index import SampleIndex


async def one_group(cfg: Any, scored: bool) -> tuple[SampleIndex, list[int]]:
    """An index with one group of two samples of step 0, generated (on "rollout0") and, when
    ``scored``, rewarded (on "reward0")."""
    index = SampleIndex()
    register_tasks(index, cfg)
    rows = index.add_group(2, [{"index": 0, "step": 0, "sample": j} for j in range(2)])
    index.mark_ready(rows, "prompt", "dataset")
    b = await index.get_batch("rollout", 1)
    ragged = ("rollout0", [[3], [4]], "int64", 0)
    index.complete(
        "rollout", b.rows, {c: ragged for c in ("prompt_ids", "response_ids", "rollout_logprobs")}
    )
    if scored:
        b = await index.get_batch("reward", 1)
        scalar = ("reward0", [[], []], "float32", -1)
        index.complete("reward", b.rows, {"reward": scalar, "advantages": scalar})
    return index, rows


def _stages(cfg: Config, index: SampleIndex, log: RunLog) -> Stages:
    return Stages(cfg, index, Fleet(cfg), log, Retry(log, cfg.timeouts.retries))


class FakeReward:
    """Stands for the reward worker's HTTP handle: answers score_groups for any batch."""

    name = "reward0"
    unit = "reward0.1"

    async def call(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert path == "/v1/work/score_groups"
        n = len(body["batch"]["rows"])
        scalar = {"shapes": [[]] * n, "dtype": "float32", "version": -1}
        return {
            "produced": {"reward": scalar, "advantages": scalar},
            "metrics": {"rewards": [1.0] * n, "failed": [], "n_failed": 0},
        }


async def test_rescoring_the_last_use_of_trained_rows_releases_them(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "algorithm.samples_per_prompt=2"])
    index, rows = await one_group(cfg, scored=True)
    train = await index.get_batch("train", 1, partition=0)  # the trainer holds the step
    index.mark_unit_lost("reward0")  # the reward worker dies: the rows go back to reward
    index.ack("train", train.rows)  # the step commits with what the trainer had pulled
    assert all(r in index for r in rows)  # kept: the reward task must score them again

    log = RunLog(tmp_path / "run")
    spec = next(s for s in stage_specs(cfg) if s.task == "reward")
    again = await index.get_batch("reward", spec.batch, at_least=1)
    await _stages(cfg, index, log).run_op(spec, FakeReward(), again)
    log.close()
    assert not any(r in index for r in rows)  # every task is done with them: released


class FakeActor:
    """The actor's handle: trains any micro-batch, counts its optimizer steps (``finish``)."""

    name = "actor0"
    unit = "actor0.1"
    url = "http://actor0"

    def __init__(self) -> None:
        self.finishes = 0

    async def call(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        if path == "/v1/work/finish":
            self.finishes += 1
            return {"version": self.finishes, "metrics": {}}
        assert path == "/v1/work/train_micro"
        return {}


async def test_a_failed_checkpoint_is_retried_without_a_second_optimizer_step(
    tmp_path: Path,
) -> None:
    """The step's save fails once (a full disk, a timeout) while the actor lives: only the
    commit is retried; the optimizer steps once on the step's samples and its rows are acked."""
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "algorithm.samples_per_prompt=2",
            "algorithm.prompts_per_step=1",
            "algorithm.micro_batch_groups=1",
            "algorithm.steps=1",  # the last step: a checkpoint is due
        ],
    )
    index, rows = await one_group(cfg, scored=True)

    actor = FakeActor()
    checkpoints = FailingOnceCheckpoints()
    sync = FakeSync()
    log = RunLog(tmp_path / "run")
    fleet = Fleet(cfg, {"actor": [actor]})
    versions = Versions()
    steps = Steps(
        cfg,
        Training(cfg, index, fleet, log),
        Retry(log, cfg.timeouts.retries),
        checkpoints,
        sync,
        Unused(),
        StepRecords(log, fleet, []),
        versions,
        Progress(1, enabled=False),
        lambda: False,
    )
    assert await steps.run(0) == 1
    log.close()
    assert actor.finishes == 1 and checkpoints.saves == [1, 1] and sync.versions == [1]
    assert versions.trained == 1
    assert not any(r in index for r in rows)  # acked: every task is done with them


class FailingOnceCheckpoints:
    """The step's checkpoint: its first save fails as a full disk does; records the versions."""

    saved = -1

    def __init__(self) -> None:
        self.saves: list[int] = []

    async def save(self, step: int, version: int, records: list[dict[str, Any]]) -> None:
        self.saves.append(version)
        if len(self.saves) == 1:
            raise WorkerError("actor0", "save: [Errno 28] No space left on device", 500)
        self.saved = step


class FakeSync:
    """A weight sync that succeeds at once; records the versions asked for."""

    def __init__(self) -> None:
        self.versions: list[int] = []

    async def run(self, version: int) -> dict[str, Any]:
        self.versions.append(version)
        return {"sync_s": 0.0}


class Unused:
    """A collaborator the test does not reach (no evaluation after the last step)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} is not used here")


class FailingReward:
    """The reward worker's handle: the first row of every call failed to score."""

    name = "reward0"
    unit = "reward0.1"

    async def call(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        rows = body["batch"]["rows"]
        scalar = {"shapes": [[]] * len(rows), "dtype": "float32", "version": -1}
        return {
            "produced": {"reward": scalar, "advantages": scalar},
            "metrics": {
                "rewards": [0.0] * len(rows),
                "failed": [[rows[0], "ValueError: bad answer"]],
                "n_failed": 1,
            },
        }


async def test_a_regenerated_group_never_reaches_a_waiting_trainer(tmp_path: Path) -> None:
    """Policy "regenerate": the failed group goes back to rollout before its scores are marked
    ready, so a trainer already waiting for the step is not handed the failed scores."""
    import asyncio

    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "algorithm.samples_per_prompt=2",
            "reward.on_failure=regenerate",
        ],
    )
    index, rows = await one_group(cfg, scored=False)
    trainer = asyncio.ensure_future(index.get_batch("train", 1, partition=0))
    await asyncio.sleep(0)
    log = RunLog(tmp_path / "run")
    spec = next(s for s in stage_specs(cfg) if s.task == "reward")
    batch = await index.get_batch("reward", spec.batch, at_least=1)
    await _stages(cfg, index, log).run_op(spec, FailingReward(), batch)
    await asyncio.sleep(0)
    assert not trainer.done()  # the failed group was not handed to the trainer
    again = index.try_get_batch("rollout", 1)
    assert again is not None and again.rows == rows  # back to rollout, to be generated anew
    assert all(index.row_meta(r)["regenerated"] == 1 for r in rows)
    trainer.cancel()
    log.close()


class SyncPeer:
    """An actor (sends) or a rollout worker (receives) in a weight sync; both at ``version``."""

    def __init__(self, name: str, version: int) -> None:
        self.name = self.unit = name
        self.url = f"http://{name}"
        self.version = version

    async def call(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        if path == "/v1/work/sync_send":
            return {"version": self.version, "metrics": {"seconds": 0.01, "bytes": 8}}
        assert path == "/v1/work/sync_recv"
        m = {"version": self.version, "recv_s": 0.01, "total_s": 0.02, "reload": "in place"}
        return {"metrics": m}


async def test_a_held_up_sync_may_deliver_newer_weights(tmp_path: Path) -> None:
    """The sync after step s waited (a rollout worker was being replaced) while step s + 1
    trained: the actor now sends version s + 2. The engines serving s + 2 is right, not an
    error that ends the run."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    workers = {
        "actor": [SyncPeer("actor0", 6)],
        "rollout": [SyncPeer("rollout0", 6), SyncPeer("rollout1", 6)],
    }
    log = RunLog(tmp_path / "run")
    versions = Versions(4)
    sync = WeightSync(cfg, Fleet(cfg, workers), versions, log, Retry(log, cfg.timeouts.retries))
    out = await sync.run(5)
    assert versions.served == 6 and out["bytes"] == 8
    workers["rollout"][1].version = 5  # one engine did not take the newest weights: an error
    with pytest.raises(RuntimeError, match="expected version 5 or newer"):
        await sync.run(5)
    log.close()
