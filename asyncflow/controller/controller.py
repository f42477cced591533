"""The controller: one asyncio process that starts the workers and trains the run.

``await Controller(config).run()`` works in any running event loop (a notebook included);
``python -m asyncflow.controller`` wraps it in uvloop. This module is the wiring and the
lifecycle of a run; each piece it wires has a module of its own:

===============  ===========================================================================
module           owns
===============  ===========================================================================
``fleet``        the worker processes: starting them, their slots, calls, stopping them
``placement``    the cores and torch threads of the workers it spawns
``supervisor``   noticing a dead worker and replacing it (state restored, sync re-formed)
``stages``       admission (bounded staleness) and the stage loops
``balance``      which worker of a role takes a stage's next batch (the least loaded)
``step``         the RL step, top to bottom, and the loop over the run's steps
``training``     one step of one trainer role over its ranks
``sync``         the weight sync to the rollout engines, and the policy versions
``evaluation``   held-out evaluation
``checkpoints``  checkpoints and resuming
``records``      each step's record and the run summary
``retry``        the one retry policy for whatever a dying worker interrupts
``concurrency``  the TaskGroup shapes every task lives in
===============  ===========================================================================

A run checks its inputs (before anything is written or started), sets an earlier run's
directory aside (or checks that a resumed one can go on), starts the workers, restores the
checkpoint when resuming, forms the weight-sync group, evaluates, trains -- the step loop with
the stage loops and the supervisor beside it -- evaluates again, and writes the summary and
the report. On success, error, cancellation or KeyboardInterrupt no spawned worker survives
(they also die with the controller process itself, even on SIGKILL).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from asyncflow.config import Config, ConfigError, from_tree
from asyncflow.controller.checkpoints import (
    Checkpoints,
    check_resumable,
    load_checkpoint,
    resumed_index,
    set_aside_earlier_run,
)
from asyncflow.controller.concurrency import run_until
from asyncflow.controller.evaluation import Evaluation
from asyncflow.controller.exporter import MetricsExporter
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.loader import PromptLoader
from asyncflow.controller.pool import WorkerHandle
from asyncflow.controller.progress import Progress
from asyncflow.controller.records import StepRecords, summarize
from asyncflow.controller.retry import Retry
from asyncflow.controller.stages import Admission, Stages, register_tasks
from asyncflow.controller.step import Steps
from asyncflow.controller.supervisor import Supervisor
from asyncflow.controller.sync import Versions, WeightSync
from asyncflow.controller.training import Training
from asyncflow.report import write_report
from asyncflow.report.tensorboard import TensorBoardWriter
from asyncflow.roles.settings import RolloutSettings, role_settings
from asyncflow.runlog import RunLog
from asyncflow.tasks.sources import eval_source, resolve_model, reward_spec, train_source
from asyncflow.transfer.index import SampleIndex


class Controller:
    """Runs one training job described by a :class:`~asyncflow.config.Config`."""

    def __init__(
        self,
        config: Config | Mapping[str, Any] | None = None,
        *,
        resume: bool = False,
        fleet: Callable[[Config], Fleet] = Fleet,
    ) -> None:
        """``resume=True`` continues the run in ``config.run_dir`` from its last checkpoint;
        ``fleet`` makes the run's :class:`~asyncflow.controller.fleet.Fleet` from its config."""
        if config is None:
            config = Config()
        elif not isinstance(config, Config):
            config = from_tree(config)
        if not config.run.token and os.environ.get("ASYNCFLOW_TOKEN"):
            config = config.model_copy(
                update={
                    "run": config.run.model_copy(update={"token": os.environ["ASYNCFLOW_TOKEN"]})
                }
            )
        self.cfg = config.with_token()
        self.resume = resume
        self.fleet = fleet(self.cfg)
        self.index = SampleIndex(self.fleet.free)
        self.summary: dict[str, Any] = {}
        self._stop = asyncio.Event()

    @property
    def workers(self) -> dict[str, list[WorkerHandle]]:
        """The run's workers by role, in slot order (as started, then as replaced)."""
        return self.fleet.workers

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> dict[str, Any]:
        """Start workers, train ``algorithm.steps`` steps, stop workers; returns the summary."""
        cfg = self.cfg
        run_dir = cfg.run_dir
        source = self._preflight()  # bad input fails here, before anything is written
        if not self.resume:
            set_aside_earlier_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = load_checkpoint(run_dir) if self.resume else None
        if self.resume and (run_dir / "config.json").is_file():
            check_resumable(json.loads((run_dir / "config.json").read_text()), cfg)
        if state is not None and int(state["step"]) >= cfg.algorithm.steps:
            # nothing to train: say so instead of starting workers for two evaluations
            print(
                f"{run_dir}: already trained {state['step']} steps (algorithm.steps="
                f"{cfg.algorithm.steps}); pass algorithm.steps=N with N > {state['step']} to "
                "train further",
                file=sys.stderr,
            )
            summary_file = run_dir / "summary.json"
            self.summary = (
                json.loads(summary_file.read_text())
                if summary_file.is_file()
                else summarize(run_dir)
            )
            return self.summary
        if not self.resume:
            public = cfg.to_json()
            public["run"]["token"] = None  # the secret stays in memory
            (run_dir / "config.json").write_text(json.dumps(public, indent=2))
        log = RunLog(run_dir, mode="a" if self.resume else "w")
        progress = Progress(cfg.algorithm.steps, enabled=cfg.run.progress)
        live = await self._live_views(log)
        try:
            async with self.fleet.running():  # every worker stopped on the way out
                progress.note("starting workers")
                await self.fleet.start()
                if source.skipped:
                    log.metrics(
                        {
                            "event": "bad_rows",
                            "count": len(source.skipped),
                            "first": source.skipped[:20],
                        }
                    )
                return await self._train(log, progress, state, len(source))
        finally:
            progress.close()
            for close in live:
                await close()
            log.close()

    async def _train(
        self, log: RunLog, progress: Progress, state: dict[str, Any] | None, prompts: int
    ) -> dict[str, Any]:
        """Wire the run's pieces to its workers, then evaluate, train, evaluate, summarize."""
        cfg = self.cfg
        if state is not None:
            self.index = resumed_index(state, self.fleet.free)
        else:
            register_tasks(self.index, cfg)
        index, fleet = self.index, self.fleet
        retry = Retry(log, cfg.timeouts.retries)
        versions = Versions()
        loader = PromptLoader(prompts, cfg.run.seed, cfg.data.shuffle)
        admission = Admission(cfg, index, loader, versions)
        stages = Stages(cfg, index, fleet, log, retry)
        checkpoints = Checkpoints(
            cfg.run_dir, cfg.checkpoint.keep, fleet, log, versions, admission, index
        )
        sync = WeightSync(cfg, fleet, versions, log, retry)
        evaluation = Evaluation(cfg, fleet, log, retry)
        records = StepRecords(log, fleet, stages.failures)
        training = Training(cfg, index, fleet, log)
        steps = Steps(
            cfg,
            training,
            retry,
            checkpoints,
            sync,
            evaluation,
            records,
            versions,
            progress,
            lambda: self.stopping,
        )
        first = await checkpoints.restore(state) if state else 0
        progress.update_to(first)
        progress.note("connecting weight sync")
        await sync.init_group()
        if state:
            await sync.run(versions.served)
        timeouts = cfg.timeouts
        supervisor = Supervisor(
            fleet, index, log, checkpoints, sync, timeouts.heartbeat_s, timeouts.start_s
        )
        async with supervisor.watching():
            await evaluation.run(first)
            beside = {"admit": admission.run(), **stages.loops()}
            beside["supervise"] = supervisor.wait_fatal()
            done = await run_until(steps.run(first), beside, name="train")
            await evaluation.run(done)
            self.summary = summarize(cfg.run_dir)
            if done < cfg.algorithm.steps:
                self.summary["stopped_early"] = True
            (cfg.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
            progress.note("writing the report")
            await self._report()
            return self.summary

    def stop(self) -> None:
        """Ask a running :meth:`run` to finish after the current step: it saves a checkpoint
        of that step (unless ``checkpoint.at_end`` is off; ``--resume`` continues from it), runs
        the final evaluation, writes the summary (``stopped_early: true``) and stops its
        workers. Safe to call from a signal handler on the run's loop; calling it again changes
        nothing."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    # ------------------------------------------------------------------ helpers
    def _preflight(self) -> Any:
        """Check the run's inputs here, before any worker starts (a vLLM engine takes a minute
        to start, and a worker that cannot read its data would only say so in its log): the
        model folder, the reward function's name, the training and evaluation prompts.
        Returns the training prompts (the loader needs their count)."""
        cfg = self.cfg
        rollout = role_settings(cfg)["rollout"]
        assert isinstance(rollout, RolloutSettings)
        checks: list[tuple[str, Callable[[], Any]]] = [
            ("model.path", lambda: resolve_model(cfg.model.path)),
            ("reward.function", lambda: reward_spec(cfg.reward.function)),
        ]
        for key, check in checks:
            try:
                check()
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
        model_dir = str(resolve_model(cfg.model.path))
        try:
            source = train_source(rollout.data, cfg.run.seed, model_dir)
        except (ValueError, OSError) as e:
            raise ConfigError(f"data.source: {e}") from None
        try:
            eval_source(rollout.data, rollout.eval, cfg.run.seed, model_dir)
        except (ValueError, OSError) as e:
            raise ConfigError(f"eval.source: {e}") from None
        return source

    async def _live_views(self, log: RunLog) -> list[Callable[[], Awaitable[None]]]:
        """Start /metrics (Prometheus) and TensorBoard; returns their closers."""
        closers: list[Callable[[], Awaitable[None]]] = []
        exporter = MetricsExporter(lambda: len(self.index))
        log.listeners.append(lambda r: exporter.event(r) if "event" in r else exporter.step(r))
        if self.cfg.run.metrics_port is not None:
            url = await exporter.start(self.cfg.run.metrics_port)
            (self.cfg.run_dir / "metrics_url").write_text(url + "\n")
            closers.append(exporter.stop)
        tb = TensorBoardWriter(self.cfg.run_dir)
        if tb.enabled:
            log.listeners.append(lambda r: tb.scalars(int(r.get("step", 0)), r))

            async def close_tb() -> None:
                tb.close()

            closers.append(close_tb)
        return closers

    async def _report(self) -> None:
        """Trace, plots and idle table of the finished run (never fails the run)."""
        try:
            await asyncio.to_thread(write_report, self.cfg.run_dir)
        except Exception as e:  # a plotting problem must not lose a finished run
            print(f"report not written: {type(e).__name__}: {e}", file=sys.stderr)
            print(f"report not written: {type(e).__name__}: {e}", file=sys.stderr)
