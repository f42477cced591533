"""The step driver (:class:`asyncflow.controller.step.Steps`) and the pieces around it, against
fakes: a failure of the background weight sync ends the run at once instead of leaving it
waiting; the concurrency shapes it is built on (:mod:`asyncflow.controller.concurrency`);
resuming and checkpointing every data-parallel rank (:class:`Checkpoints`); an evaluation cut
off by a dying worker (:class:`Evaluation`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from asyncflow.config import Config, load_config
from asyncflow.controller.checkpoints import Checkpoints
from asyncflow.controller.concurrency import all_of, run_until
from asyncflow.controller.evaluation import Evaluation
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.loader import PromptLoader
from asyncflow.controller.pool import WorkerError
from asyncflow.controller.progress import Progress
from asyncflow.controller.records import StepRecords
from asyncflow.controller.retry import Retry
from asyncflow.controller.stages import Admission
from asyncflow.controller.step import Steps
from asyncflow.controller.sync import Versions
from asyncflow.roles.ops import FinishResult
from asyncflow.runlog import RunLog
from asyncflow.transfer.index import SampleIndex


class FakeTrainer:
    """One try of a step: no micro-batches; step 0 finishes, a later step never does (its
    rollout waits for the version step 0's sync would have served)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.records: list[dict[str, Any]] = []

    async def ready(self) -> AsyncIterator[Any]:
        for _ in ():
            yield _

    def accumulate(self, micro: Any) -> None:
        raise AssertionError("no micro-batch")

    async def finish(self) -> list[FinishResult]:
        if self.step > 0:
            await asyncio.Event().wait()  # never: the sync it needs failed
        return [FinishResult(version=self.step + 1, metrics={})]

    def ranks_lost(self) -> bool:
        return False


class FakeTraining:
    """Records the steps tried."""

    def __init__(self) -> None:
        self.trained: list[int] = []

    @contextlib.asynccontextmanager
    async def attempt(self, role: Any, step: int, n: int) -> AsyncIterator[FakeTrainer]:
        self.trained.append(step)
        yield FakeTrainer(step)


class FailingSync:
    """Every weight sync fails (as after its retries ran out)."""

    async def run(self, version: int) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        raise RuntimeError(f"weight sync to version {version}: failed 33 times in a row")


class Unused:
    """A collaborator the test does not reach."""

    saved = -1

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} is not used here")


async def test_a_failed_weight_sync_at_k0_fails_the_run_instead_of_hanging(
    tmp_path: Path,
) -> None:
    cfg = load_config(
        None,
        [f"run.output_dir={tmp_path}", "algorithm.staleness=0", "algorithm.streaming=false"],
    )
    log = RunLog(tmp_path / "run")
    training = FakeTraining()
    steps = Steps(
        cfg,
        training,
        Retry(log, cfg.timeouts.retries),
        Unused(),
        FailingSync(),
        Unused(),
        StepRecords(log, Fleet(cfg), []),
        Versions(),
        Progress(10, enabled=False),
        lambda: False,
    )
    try:
        with pytest.raises(RuntimeError, match="weight sync to version 1"):
            await asyncio.wait_for(steps.run(0), 20)
    finally:
        log.close()
    assert training.trained == [0, 1]


async def test_first_failure_returns_the_main_result_when_the_side_task_succeeds() -> None:
    async def side() -> None:
        await asyncio.sleep(0)

    async def main() -> int:
        await asyncio.sleep(0.02)
        return 7

    assert await run_until(main(), {"side": side()}) == 7
    assert await run_until(main(), {}) == 7


async def test_first_failure_raises_the_main_error_and_cancels_on_a_side_error() -> None:
    async def boom(what: str, delay: float) -> int:
        await asyncio.sleep(delay)
        raise ValueError(what)

    with pytest.raises(ValueError, match="main"):
        await run_until(boom("main", 0), {"side": asyncio.sleep(1)})
    cancelled = asyncio.Event()

    async def forever() -> int:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return 0

    with pytest.raises(ValueError, match="side"):
        await run_until(forever(), {"side": boom("side", 0.01)})
    assert cancelled.is_set()


class FakeRank:
    """A trainer rank's handle: records the ops asked of it (and of its peers) in order."""

    def __init__(self, name: str, calls: list[tuple[str, str, dict[str, Any]]]) -> None:
        self.name = self.unit = name
        self.url = f"http://{name}"
        self.calls = calls

    async def call(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.calls.append((self.name, path.removeprefix("/v1/work/"), body["params"]))
        return {"ok": True, "version": 4}  # what a rank answers to save and load


def _checkpoints(cfg: Config, fleet: Fleet, log: RunLog) -> tuple[Checkpoints, Admission, Versions]:
    versions = Versions()
    index = SampleIndex()
    admission = Admission(cfg, index, PromptLoader(100, cfg.run.seed), versions)
    ckpt = Checkpoints(cfg.run_dir, cfg.checkpoint.keep, fleet, log, versions, admission, index)
    return ckpt, admission, versions


async def test_a_moved_run_directory_resumes_from_where_it_is_now(tmp_path: Path) -> None:
    """The checkpoint records the absolute path it was written at; a run directory copied
    elsewhere (or a volume mounted at another path) loads from its own checkpoint folder."""
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'moved'}", "run.name=r"])
    calls: list[tuple[str, str, dict[str, Any]]] = []
    fleet = Fleet(cfg, {"actor": [FakeRank("actor0", calls), FakeRank("actor1", calls)]})
    state = {
        "step": 4,
        "version": 4,
        "loader": {"position": 32},
        "admitted_steps": 5,
        "index": SampleIndex().snapshot(),
        "samples_before": 0,
        "samples_step": [],
        "path": str(tmp_path / "old" / "r" / "checkpoints" / "step_000004"),
    }
    log = RunLog(cfg.run_dir)
    checkpoints, admission, versions = _checkpoints(cfg, fleet, log)
    try:
        assert await checkpoints.restore(state) == 4
    finally:
        log.close()
    here = {"path": str((cfg.run_dir / "checkpoints" / "step_000004").resolve())}
    assert [(op, params) for _, op, params in calls] == [("load", here)] * 2  # every DP rank
    assert [name for name, _, _ in calls] == ["actor0", "actor1"]
    assert admission.loader.position == 32 and versions.served == 4
    assert admission.admitted_steps == 5


async def test_every_data_parallel_rank_takes_part_in_a_checkpoint(tmp_path: Path) -> None:
    """Rank 0 writes and waits at a barrier for the others: asking rank 0 alone hung."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "actor.workers=2"])
    calls: list[tuple[str, str, dict[str, Any]]] = []
    fleet = Fleet(cfg, {"actor": [FakeRank("actor0", calls), FakeRank("actor1", calls)]})
    log = RunLog(cfg.run_dir)
    checkpoints, _, _ = _checkpoints(cfg, fleet, log)
    try:
        await checkpoints.save(2, 2, [])
    finally:
        log.close()
    assert [op for _, op, _ in calls] == ["save", "save"]
    assert [name for name, _, _ in calls] == ["actor0", "actor1"]
    assert (cfg.run_dir / "checkpoints" / "step_000002" / "controller_state.json").is_file()


async def test_ppo_steps_fail_together() -> None:
    """The actor's step failing cancels the critic's (no orphan task) and raises as itself."""
    cancelled = asyncio.Event()

    async def actor() -> int:
        await asyncio.sleep(0.01)
        raise ConnectionError("actor0 died")

    async def critic() -> int:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return 0

    with pytest.raises(ConnectionError, match="actor0 died"):
        await all_of([("actor", actor()), ("critic", critic())])
    assert cancelled.is_set()

    async def value(v: int) -> int:
        await asyncio.sleep(0.01 * v)
        return v

    assert await all_of([("a", value(2)), ("b", value(1))]) == [2, 1]


class DyingOnceRollout:
    """The rollout worker's handle: its first evaluation is cut off (it died), the second
    (its replacement) answers."""

    name = "rollout0"
    unit = "rollout0"
    url = "http://rollout0"

    def __init__(self, status: int | None) -> None:
        self.calls = 0
        self.status = status

    async def call(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert path == "/v1/work/evaluate"
        self.calls += 1
        if self.calls == 1:
            raise WorkerError("rollout0", "connection reset", self.status)
        m = {"accuracy": 0.5, "mean_reward": 0.5, "n": 8, "version": 3, "skipped_rows": 0}
        m |= {"mean_length": 4.0, "examples": [["1+1=", "2"]]}
        return {"metrics": m}


@pytest.mark.parametrize("status", [None, 500])
async def test_an_evaluation_cut_off_by_a_dying_worker_is_tried_again(
    tmp_path: Path, status: int | None
) -> None:
    """A lost connection (the worker died; the supervisor replaces it) is retried; an error the
    worker answered with is not (it would only repeat)."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    log = RunLog(tmp_path / "run")
    rollout = DyingOnceRollout(status)
    fleet = Fleet(cfg, {"rollout": [rollout]})
    evaluation = Evaluation(cfg, fleet, log, Retry(log, cfg.timeouts.retries))
    try:
        if status is None:
            out = await evaluation.run(3)
            assert out["eval_accuracy"] == 0.5 and rollout.calls == 2
        else:
            with pytest.raises(WorkerError):
                await evaluation.run(3)
            assert rollout.calls == 1
    finally:
        log.close()
