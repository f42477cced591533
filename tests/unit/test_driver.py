"""The controller's step driver (``Controller._steps``) against a scripted pipeline: a failure
of the background weight sync ends the run at once instead of leaving it waiting."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from asyncflow.config import load_config
from asyncflow.controller.controller import Controller, _all_or_none, _first_failure
from asyncflow.controller.progress import Progress
from asyncflow.runlog import RunLog


class SyncFails:
    """Step 0 trains; its weight sync fails; step 1 cannot train before that sync (k = 0: its
    rollout waits for version 1), so its training never returns."""

    def __init__(self) -> None:
        self.trained: list[int] = []

    async def train_step(self, step: int, *args: Any) -> list[dict[str, Any]]:
        self.trained.append(step)
        if step > 0:
            await asyncio.Event().wait()  # never: the sync it needs failed
        return [{"version": step + 1, "metrics": {}}]

    async def sync_weights(self, version: int) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        raise RuntimeError(f"weight sync to version {version}: failed 33 times in a row")


async def test_a_failed_weight_sync_at_k0_fails_the_run_instead_of_hanging(
    tmp_path: Path,
) -> None:
    cfg = load_config(
        None,
        [f"run.output_dir={tmp_path}", "algorithm.staleness=0", "algorithm.streaming=false"],
    )
    controller = Controller(cfg)
    controller.pipeline = SyncFails()  # type: ignore[assignment]
    log = RunLog(tmp_path / "run")
    try:
        with pytest.raises(RuntimeError, match="weight sync to version 1"):
            await asyncio.wait_for(controller._steps(log, Progress(10, enabled=False), 0), 20)
    finally:
        log.close()
    assert controller.pipeline.trained == [0, 1]  # type: ignore[attr-defined]


async def test_first_failure_returns_the_main_result_when_the_side_task_succeeds() -> None:
    async def side() -> None:
        await asyncio.sleep(0)

    async def main() -> int:
        await asyncio.sleep(0.02)
        return 7

    task = asyncio.create_task(side())
    assert await _first_failure(main(), task) == 7
    assert await _first_failure(main(), None) == 7


async def test_first_failure_raises_the_main_error_and_cancels_on_a_side_error() -> None:
    async def boom(what: str, delay: float) -> int:
        await asyncio.sleep(delay)
        raise ValueError(what)

    with pytest.raises(ValueError, match="main"):
        await _first_failure(boom("main", 0), asyncio.create_task(asyncio.sleep(1)))
    cancelled = asyncio.Event()

    async def forever() -> int:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return 0

    with pytest.raises(ValueError, match="side"):
        await _first_failure(forever(), asyncio.create_task(boom("side", 0.01)))
    assert cancelled.is_set()


class RecordingPipeline:
    """What :meth:`Controller._restore` touches, recording the calls it makes."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.workers_called: list[Any] = []
        self.loader = SimpleNamespace(position=0, state=lambda: {"position": 0})
        self.log = SimpleNamespace(samples_written=0)
        self.index: Any = None
        self.admitted_steps = self.version = self.trained_version = 0

    async def call(self, worker: Any, op: str, batch: Any = None, params: Any = None) -> Any:
        self.calls.append((op, params))
        self.workers_called.append(worker)
        return {}


async def test_a_moved_run_directory_resumes_from_where_it_is_now(tmp_path: Path) -> None:
    """The checkpoint records the absolute path it was written at; a run directory copied
    elsewhere (or a volume mounted at another path) loads from its own checkpoint folder."""
    from asyncflow.transfer.index import SampleIndex

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'moved'}", "run.name=r"])
    controller = Controller(cfg, resume=True)
    pipe = RecordingPipeline()
    controller.pipeline = pipe  # type: ignore[assignment]
    controller.workers = {"actor": ["actor0", "actor1"]}  # type: ignore[dict-item]
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
    try:
        assert await controller._restore(state, log) == 4
    finally:
        log.close()
    here = {"path": str((cfg.run_dir / "checkpoints" / "step_000004").resolve())}
    assert pipe.calls == [("load", here)] * 2  # every data-parallel rank loads
    assert pipe.workers_called == ["actor0", "actor1"]
    assert pipe.loader.position == 32 and pipe.version == 4 and pipe.admitted_steps == 5


async def test_every_data_parallel_rank_takes_part_in_a_checkpoint(tmp_path: Path) -> None:
    """Rank 0 writes and waits at a barrier for the others: asking rank 0 alone hung."""
    from asyncflow.transfer.index import SampleIndex

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "actor.workers=2"])
    controller = Controller(cfg)
    pipe = RecordingPipeline()
    controller.pipeline = pipe  # type: ignore[assignment]
    controller.index = SampleIndex()
    controller.workers = {"actor": ["actor0", "actor1"]}  # type: ignore[dict-item]
    await controller._checkpoint(2, 2, [])
    assert [op for op, _ in pipe.calls] == ["save", "save"]
    assert pipe.workers_called == ["actor0", "actor1"]
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
        await _all_or_none([actor(), critic()])
    assert cancelled.is_set()

    async def value(v: int) -> int:
        await asyncio.sleep(0.01 * v)
        return v

    assert await _all_or_none([value(2), value(1)]) == [2, 1]


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
        from asyncflow.controller.pool import WorkerError

        assert path == "/v1/work/evaluate"
        self.calls += 1
        if self.calls == 1:
            raise WorkerError("rollout0", "connection reset", self.status)
        m = {"accuracy": 0.5, "mean_reward": 0.5, "n": 8, "version": 3}
        return {"metrics": m}


@pytest.mark.parametrize("status", [None, 500])
async def test_an_evaluation_cut_off_by_a_dying_worker_is_tried_again(
    tmp_path: Path, status: int | None
) -> None:
    """A lost connection (the worker died; the supervisor replaces it) is retried; an error the
    worker answered with is not (it would only repeat)."""
    from asyncflow.controller.pool import WorkerError
    from asyncflow.controller.stages import Pipeline
    from asyncflow.transfer.index import SampleIndex

    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    controller = Controller(cfg)
    log = RunLog(tmp_path / "run")
    rollout = DyingOnceRollout(status)
    controller.pipeline = Pipeline(cfg, SampleIndex(), {"rollout": [rollout]}, None, log)  # type: ignore[arg-type,dict-item]
    try:
        if status is None:
            out = await controller._evaluate(3, log)
            assert out["eval_accuracy"] == 0.5 and rollout.calls == 2
        else:
            with pytest.raises(WorkerError):
                await controller._evaluate(3, log)
            assert rollout.calls == 1
    finally:
        log.close()
