"""The controller: one asyncio process that starts the workers and drives the stage loops.

``await Controller(config).run()`` works in any running event loop (a notebook included);
``python -m asyncflow.controller`` wraps it in uvloop. It owns:

- the worker processes (spawned locally, or attached by URL) and their shutdown -- on success,
  error, cancellation or KeyboardInterrupt no spawned worker survives (they also die with the
  controller process itself, even on SIGKILL);
- the :class:`~asyncflow.transfer.index.SampleIndex` (metadata only: tensors move between
  workers, never through here);
- the training loop: per step, stream the step's micro-batches to the trainer ranks, one
  optimizer step, then a weight sync that bumps the served policy version and so admits the
  next step (see :mod:`asyncflow.controller.stages` for the loop table);
- evaluation, metrics, checkpoints and the run summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from asyncflow.config import Config, ConfigError, from_tree
from asyncflow.controller.exporter import MetricsExporter
from asyncflow.controller.loader import PromptLoader
from asyncflow.controller.placement import place
from asyncflow.controller.pool import WorkerError, WorkerHandle, attach_worker, spawn_worker
from asyncflow.controller.progress import Progress
from asyncflow.controller.stages import (
    Commit,
    Pipeline,
    cancel_all,
    register_tasks,
    stage_specs,
    tasks_of,
)
from asyncflow.controller.supervisor import Supervisor
from asyncflow.report import write_report
from asyncflow.report.tensorboard import TensorBoardWriter
from asyncflow.roles.settings import (
    DistributedSettings,
    RoleSettings,
    RolloutSettings,
    role_settings,
)
from asyncflow.runlog import (
    RunLog,
    StepStats,
    busy_by_worker,
    mean,
    recorded_steps,
    recovered_step_record,
)
from asyncflow.tasks.sources import eval_source, resolve_model, reward_spec, train_source
from asyncflow.transfer.index import SampleIndex


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class Controller:
    """Runs one training job described by a :class:`~asyncflow.config.Config`."""

    def __init__(
        self, config: Config | Mapping[str, Any] | None = None, *, resume: bool = False
    ) -> None:
        """``resume=True`` continues the run in ``config.run_dir`` from its last checkpoint."""
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
        self.supervisor: Supervisor | None = None
        self.workers: dict[str, list[WorkerHandle]] = {}
        self.index = SampleIndex(self._free)
        self.pipeline: Pipeline | None = None
        self._failures_logged = 0  # reward failures already shown in a step record
        self.summary: dict[str, Any] = {}
        self._stop = asyncio.Event()
        self._steps_done = 0  # steps trained, as of the last one finished
        self._saved_step = -1  # the step number of the newest checkpoint this run wrote
        self._bg: set[asyncio.Task[Any]] = set()

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
                else self._summarize()
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
            progress.note("starting workers")
            await self._start_workers(run_dir)
            if source.skipped:
                log.metrics(
                    {
                        "event": "bad_rows",
                        "count": len(source.skipped),
                        "first": source.skipped[:20],
                    }
                )
            loader = PromptLoader(len(source), cfg.run.seed, cfg.data.shuffle)
            register_tasks(self.index, cfg)
            self.pipeline = Pipeline(cfg, self.index, self.workers, loader, log)
            first = await self._restore(state, log) if state else 0
            progress.update_to(first)
            progress.note("connecting weight sync")
            await self._init_sync()
            if state:
                await self.pipeline.sync_weights(self.pipeline.version)
            self.supervisor = Supervisor(
                self.pipeline,
                self._respawn,
                self._init_sync,
                (run_dir / "checkpoints").resolve(),
                cfg.timeouts.heartbeat_s,
                cfg.timeouts.start_s,
            )
            self.supervisor.watch_all()
            await self._evaluate(first, log)
            self._steps_done = first
            await self._train(log, progress, first)
            await self._evaluate(self._steps_done, log)
            self.summary = self._summarize()
            if self._steps_done < cfg.algorithm.steps:
                self.summary["stopped_early"] = True
            (run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
            progress.note("writing the report")
            await self._report()
            return self.summary
        finally:
            progress.close()
            for close in live:
                await close()
            if self.supervisor is not None:
                await self.supervisor.close()
            await cancel_all(list(self._bg))
            await self._stop_workers()
            log.close()

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
        self.exporter = exporter
        return closers

    async def _report(self) -> None:
        """Trace, plots and idle table of the finished run (never fails the run)."""
        try:
            await asyncio.to_thread(write_report, self.cfg.run_dir)
        except Exception as e:  # a plotting problem must not lose a finished run
            print(f"report not written: {type(e).__name__}: {e}", file=sys.stderr)

    async def _restore(self, state: dict[str, Any], log: RunLog) -> int:
        """Continue from a checkpoint: the actor's weights and optimizer (with PPO the critic's
        too, from the checkpoint's ``critic/`` folder), the loader position, the index (its
        rows' data died with the old workers, so every unit is marked lost and lineage
        recomputes it), and the trained-sample log cut back to the checkpoint."""
        p = self.pipeline
        assert p is not None
        restored = SampleIndex.restore(state["index"], self._free)
        for unit in list(restored.resident_units()):
            if unit != "dataset":
                restored.mark_unit_lost(unit)
        self.index = p.index = restored
        p.loader.position = int(state["loader"]["position"])
        p.admitted_steps = int(state["admitted_steps"])
        p.version = p.trained_version = int(state["version"])
        # where the run directory is now (it may have been moved, or mounted elsewhere), not
        # the absolute path recorded when the checkpoint was written
        path = self._checkpoint_dir(int(state["step"]))
        actors = list(self.workers["actor"])  # every data-parallel rank loads the same state
        await asyncio.gather(*(p.call(w, "load", params={"path": str(path)}) for w in actors))
        if "critic" in self.workers:
            critic = path / Supervisor.CRITIC_SUBDIR
            ranks = self.workers["critic"]
            if (critic / "trainer_state.json").is_file():
                outs = await asyncio.gather(
                    *(p.call(w, "load", params={"path": str(critic)}) for w in ranks)
                )
                critic_version = int(outs[0]["version"])
            else:  # a checkpoint written before critics were saved: say so, loudly
                critic_version = int((await ranks[0].get("/v1/info")).get("policy_version", 0))
                warning = (
                    f"{path} holds no critic checkpoint (critic/): the critic starts from its "
                    "initial weights and a fresh value head"
                )
                print(f"warning: {warning}", file=sys.stderr)
                log.metrics({"event": "critic_not_restored", "why": warning, "time_s": log.now()})
            # the steps the critic's version counts less than the actor's (0 unless it was not
            # restored): _save_critic waits for the critic to have taken the step it saves
            self._critic_behind = int(state["version"]) - critic_version
        log.truncate_samples(int(state["samples_before"]), state["samples_step"])
        last = int(state["step"]) - 1  # committed; its record is written after its sync
        if last >= 0 and last not in recorded_steps(self.cfg.run_dir / "metrics.jsonl"):
            log.metrics(recovered_step_record(last, p.version, state["samples_step"], log.now()))
        log.metrics(
            {"event": "resumed", "step": state["step"], "version": p.version, "time_s": log.now()}
        )
        return int(state["step"])

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

    # ------------------------------------------------------------------ workers
    def _roles(self) -> dict[str, tuple[int, list[str]]]:
        c = self.cfg
        roles = {
            "rollout": (c.rollout.workers, c.rollout.urls),
            "reward": (c.reward.workers, c.reward.urls),
            "actor": (c.actor.workers, c.actor.urls),
        }
        if c.algorithm.kl_coef > 0:
            roles["reference"] = (c.reference.workers, c.reference.urls)
        if c.algorithm.name == "ppo":
            roles["critic"] = (c.critic.workers, c.critic.urls)
        return roles

    async def _start_workers(self, run_dir: Path) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._role_settings: dict[str, RoleSettings] = place(
            self.cfg, role_settings(self.cfg), cpus
        )
        self._dist_ports = {r: free_port(self.cfg.run.host) for r in ("actor", "critic")}
        token = self.cfg.run.token or ""
        jobs: list[tuple[str, Any]] = []
        for role, (n, urls) in self._roles().items():
            if urls:
                wait_s = self.cfg.timeouts.start_s
                jobs += [
                    (role, attach_worker(role, f"{role}{i}", u, token, wait_s))
                    for i, u in enumerate(urls)
                ]
            else:
                jobs += [(role, self._spawn_one(role, i, 0)) for i in range(n)]
        # The first worker that fails to start fails the start at once (the others are
        # stopped: a spawn killed mid-start kills its process); every worker that did start is
        # registered even when run() is cancelled meanwhile, so _stop_workers stops it.
        tasks = [(role, asyncio.ensure_future(j)) for role, j in jobs]
        try:
            await asyncio.wait([t for _, t in tasks], return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for _, t in tasks:
                t.cancel()
            results = await asyncio.gather(*(t for _, t in tasks), return_exceptions=True)
            for (role, _), h in zip(tasks, results):
                if isinstance(h, WorkerHandle):
                    self.workers.setdefault(role, []).append(h)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]

    async def _spawn_one(self, role: str, i: int, generation: int) -> WorkerHandle:
        """Spawn slot ``i`` of ``role``; a restart (generation > 0) gets a new unit name."""
        n = self._roles()[role][0]
        s = self._role_settings[role]
        if role in ("actor", "critic") and n > 1:
            rank = DistributedSettings(
                rank=i,
                world_size=n,
                master_addr=self.cfg.run.host,
                master_port=self._dist_ports[role],
            )
            s = s.model_copy(update={"distributed": rank})
        name = f"{role}{i}"
        return await spawn_worker(
            role,
            name,
            self.cfg.run.token or "",
            s,
            host=self.cfg.run.host,
            log_dir=self.cfg.run_dir / "logs",
            start_timeout=self.cfg.timeouts.start_s,
            unit=name if generation == 0 else f"{name}.{generation}",
        )

    async def _respawn(self, role: str, i: int, generation: int) -> WorkerHandle:
        if role in ("actor", "critic") and self._roles()[role][0] > 1:
            raise RuntimeError(
                f"{role}{i} died: data-parallel trainer ranks cannot be replaced "
                "one at a time (their process group died with it)"
            )
        return await self._spawn_one(role, i, generation)

    async def _stop_workers(self) -> None:
        handles = [h for hs in self.workers.values() for h in hs]
        await asyncio.gather(*(h.stop() for h in handles), return_exceptions=True)

    def _free(self, by_unit: dict[str, list[int]]) -> None:
        """Index callback: rows every task consumed; tell their storage units to drop them."""
        for unit, rows in by_unit.items():
            handle = next((h for hs in self.workers.values() for h in hs if h.unit == unit), None)
            if handle is None:
                continue  # "dataset": prompts live in the dataset, nothing to free
            task = asyncio.get_running_loop().create_task(
                handle.call("/v1/storage/free", {"rows": rows}, timeout=60)
            )
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)
            # best effort: a dead worker's rows died with it (its unit is marked lost)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _init_sync(self) -> None:
        rollouts = self.workers["rollout"]
        actor = self.workers["actor"][0]
        backend = self.cfg.sync.backend
        if backend == "auto":  # NCCL only where every end of the broadcast is on a GPU
            infos = await asyncio.gather(*(h.get("/v1/info") for h in [actor, *rollouts]))
            on_gpu = all(str(i.get("device", "cpu")).startswith("cuda") for i in infos)
            backend = "nccl" if on_gpu else "gloo"
        # The actor's rank 0 hosts the rendezvous: use the address we reach it at. (A port
        # free here may not be free there: multi-host runs set sync.port.)
        host = urlsplit(actor.url).hostname or self.cfg.run.host
        port = self.cfg.sync.port or free_port(self.cfg.run.host)
        params = {
            "host": host,
            "port": port,
            "world_size": 1 + len(rollouts),
            "backend": backend,
            "timeout_s": self.cfg.sync.timeout_s,
            "bucket_mb": self.cfg.sync.bucket_mb,
        }
        assert self.pipeline is not None
        await asyncio.gather(
            self.pipeline.call(actor, "sync_init", params=params),
            *(
                self.pipeline.call(w, "sync_init", params={**params, "rank": i + 1})
                for i, w in enumerate(rollouts)
            ),
        )

    # ------------------------------------------------------------------ the loop
    async def _train(self, log: RunLog, progress: Progress, first: int) -> None:
        p = self.pipeline
        assert p is not None
        cfg = self.cfg
        loops: list[asyncio.Task[None]] = []
        # Enough slots that every admitted group (k + 1 steps' worth) can be in flight at once:
        # the rollout engine batches them all (continuous batching).
        slots = cfg.algorithm.prompts_per_step * (cfg.algorithm.staleness + 1)
        try:
            async with asyncio.TaskGroup() as tg:
                loops.append(
                    tg.create_task(
                        p.admit_loop(p.admitted_steps, cfg.algorithm.steps), name="admit"
                    )
                )
                for spec in stage_specs(cfg):
                    n_slots = slots if cfg.algorithm.streaming else 1
                    for i, w in enumerate(self.workers[spec.role]):
                        for j in range(n_slots):
                            loops.append(
                                tg.create_task(
                                    p.stage_loop(spec, spec.role, i),
                                    name=f"{spec.task}-{w.name}-{j}",
                                )
                            )
                if self.supervisor is not None:
                    loops.append(tg.create_task(self.supervisor.wait_fatal(), name="supervise"))
                driver = tg.create_task(self._steps(log, progress, first), name="train")
                driver.add_done_callback(lambda _t: [t.cancel() for t in loops])
        except BaseExceptionGroup as eg:
            real = [e for e in eg.exceptions if not isinstance(e, asyncio.CancelledError)]
            if len(real) == 1:
                raise real[0] from None
            raise

    async def _steps(self, log: RunLog, progress: Progress, first: int) -> None:
        p = self.pipeline
        assert p is not None
        cfg = self.cfg
        training = {t.name: t for t in tasks_of(cfg) if t.trains}
        progress.note("training")
        self._last_step_end = log.now()  # step times start here, after start-up and eval
        # The weight sync after step s (and that step's record) runs in the background while
        # the trainer starts step s + 1: its rows were generated by version >= s - k + 1, so
        # they never wait for this sync; only the next sync, an evaluation, a stop or the end
        # of the run waits for it. The actor refuses to step its optimizer while a send reads
        # the weights (ActorRole), so the weights sent are exactly version s + 1.
        pending: asyncio.Task[None] | None = None
        try:
            for step in range(first, cfg.algorithm.steps):
                commit = self._commit_for(step)
                actor = training["train"]
                jobs = [p.train_step(step, actor.role, actor.name, [*actor.loss_columns], commit)]
                if (critic := training.get("critic_train")) is not None:
                    jobs.append(
                        p.train_step(step, critic.role, critic.name, [*critic.loss_columns])
                    )
                # the previous step's sync fails this one at once: at k = 0 the step cannot even
                # be admitted before that sync, so waiting for its training would wait forever
                outs = await _first_failure(_all_or_none(jobs), pending)
                if pending is not None:
                    await pending
                    pending = None
                last = step + 1 == cfg.algorithm.steps
                evaluate = bool(cfg.eval.every and (step + 1) % cfg.eval.every == 0 and not last)
                pending = asyncio.create_task(
                    self._close_step(step, outs, evaluate, log, progress), name=f"sync-{step}"
                )
                self._steps_done = step + 1
                # a stop needs this step checkpointed; one requested after this step's commit
                # is honoured after the next step, whose commit sees it
                stop = self._stop.is_set() and (
                    not cfg.checkpoint.at_end or self._saved_step == step + 1
                )
                if evaluate or last or stop:
                    await pending
                    pending = None
                if stop:
                    break
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending

    async def _close_step(
        self,
        step: int,
        outs: list[list[dict[str, Any]]],
        evaluate: bool,
        log: RunLog,
        progress: Progress,
    ) -> None:
        """Sync the new weights to the rollout engines, then log and show the step."""
        p = self.pipeline
        assert p is not None
        version = int(outs[0][0]["version"])
        sync = await p.sync_weights(version)
        record = self._step_record(step, outs, sync, log)
        if evaluate:
            record.update(await self._evaluate(step + 1, log))
        log.metrics(record)
        progress.update(record)

    def _commit_for(self, step: int) -> Commit:
        """What makes step ``step``'s update durable before its rows count as trained: a
        checkpoint when one is due (every ``checkpoint.every`` steps, and after the last)."""
        every = self.cfg.checkpoint.every
        last = step + 1 == self.cfg.algorithm.steps
        due = (every and (step + 1) % every == 0) or (last and self.cfg.checkpoint.at_end)

        async def commit(outs: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
            # a stop (see :meth:`stop`) ends the run at this step: save it
            if due or (self._stop.is_set() and self.cfg.checkpoint.at_end):
                await self._checkpoint(step + 1, int(outs[0]["version"]), records)

        return commit

    def _step_record(
        self, step: int, outs: list[list[dict[str, Any]]], sync: dict[str, Any], log: RunLog
    ) -> dict[str, Any]:
        p = self.pipeline
        assert p is not None
        st = p.stats.pop(step, StepStats(step, log.now()))
        now = log.now()
        prev_end = getattr(self, "_last_step_end", 0.0)
        self._last_step_end = now
        wall = max(now - prev_end, 1e-9)
        actor = outs[0][0]["metrics"]
        lags = dict(sorted(st.lags.items()))
        busy = busy_by_worker(log.spans, prev_end, now)
        names = [h.name for hs in self.workers.values() for h in hs]
        rec: dict[str, Any] = {
            "step": step,
            "version": int(outs[0][0]["version"]),
            "time_s": now,
            "step_time_s": wall,
            "reward_mean": mean(st.rewards),
            "accuracy": mean([1.0 if r > 0 else 0.0 for r in st.rewards]),
            "samples": st.samples,
            "response_tokens": st.response_tokens,
            "samples_per_s": st.samples / wall,
            "tokens_per_s": st.response_tokens / wall,
            "staleness_hist": {str(k): v for k, v in lags.items()},
            "staleness_mean": (sum(k * v for k, v in lags.items()) / max(sum(lags.values()), 1)),
            "staleness_max": max(lags, default=0),
            "sync_s": sync["sync_s"],
            # the trainer's broadcast, the slowest engine's receive and its in-place reload
            "sync_send_s": sync.get("send_s", 0.0),
            "sync_recv_s": sync.get("recv_s", 0.0),
            "sync_reload_s": sync.get("reload_s", 0.0),
            "idle_frac": {n: round(1.0 - min(busy.get(n, 0.0) / wall, 1.0), 4) for n in names},
        }
        for k in (
            "loss",
            "pg_loss",
            "kl_loss",
            "entropy",
            "grad_norm",
            "clip_frac",
            "approx_kl_behaviour",
            "tis_weight_mean",
            "tis_weight_max",
            "tis_weight_min",
            "tis_truncated_frac",
            "ratio_mean",
            "lr",
            "trained_rows_frac",
        ):
            if k in actor:
                rec[k] = actor[k]
        if len(outs) > 1:
            rec["value_loss"] = outs[1][0]["metrics"].get("loss")
        rec["stage_time_s"] = _stage_times(log, prev_end, now)
        log.forget_spans(now)
        rec["reward_failures"] = len(p.failures)
        if fresh := p.failures[self._failures_logged :]:  # why, in the user's own words
            rec["reward_errors"] = sorted({f["error"] for f in fresh})[:3]
        self._failures_logged = len(p.failures)
        return rec

    # ------------------------------------------------------------------ eval and checkpoints
    async def _evaluate(self, step: int, log: RunLog) -> dict[str, Any]:
        p = self.pipeline
        assert p is not None
        t0 = time.monotonic()
        params = {"reward": self.cfg.reward.function, "timeout_s": self.cfg.reward.timeout_s}
        failures = 0
        while True:
            # the current rollout worker of slot 0: a dead one is replaced by the supervisor
            # (and given the current weights) before the evaluation is tried again
            worker = p.handle("rollout", 0)
            await p.wait_ready(worker)
            try:
                out = await p.call(worker, "evaluate", params=params)
                break
            except WorkerError as e:
                if e.status is not None:
                    raise  # the worker answered with an error: trying again would repeat it
                failures = p.note_failure(f"evaluation at step {step}", e, failures)
                await asyncio.sleep(min(0.05 * 2**failures, 2.0))
        m = out["metrics"]
        rec = {
            "event": "eval",
            "step": step,
            "eval_accuracy": m["accuracy"],
            "eval_mean_reward": m["mean_reward"],
            "eval_n": m["n"],
            "eval_version": m["version"],
            "eval_s": time.monotonic() - t0,
        }
        log.metrics(rec)
        return {k: v for k, v in rec.items() if k.startswith("eval_")}

    async def _checkpoint(self, step: int, version: int, records: list[dict[str, Any]]) -> None:
        """The actor (weights + optimizer), with PPO the critic (the same, in ``critic/``), and
        everything the controller needs to resume at ``step``: loader position, index snapshot,
        and this step's sample records. ``controller_state.json`` is written last, atomically:
        a checkpoint is whole or absent."""
        p = self.pipeline
        assert p is not None
        path = self._checkpoint_dir(step)
        # every data-parallel rank: rank 0 writes, the others wait at its barrier
        actors = list(self.workers["actor"])
        await asyncio.gather(*(p.call(w, "save", params={"path": str(path)}) for w in actors))
        if "critic" in self.workers:
            await self._save_critic(path / Supervisor.CRITIC_SUBDIR, version)
        path.mkdir(parents=True, exist_ok=True)  # the actor may be on another host
        state = {
            "step": step,
            "version": version,
            "loader": p.loader.state(),
            "admitted_steps": p.admitted_steps,
            # this step's rows are acknowledged right after this commit: saved as released
            "index": self.index.snapshot(done=[int(r["row"]) for r in records]),
            "samples_before": p.log.samples_written,
            "samples_step": records,
            "path": str(path),
        }
        tmp = path / "controller_state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(path / "controller_state.json")  # atomic: a checkpoint is whole or absent
        self._saved_step = step
        self._prune_checkpoints()

    async def _save_critic(self, path: Path, version: int) -> None:
        """Save the PPO critic (every rank: rank 0 writes, the others wait at its barrier) once
        it has taken this step's update: its step runs beside the actor's, and this is the
        actor's commit. Its version counts its steps, like the actor's (less any steps it is
        behind, see :meth:`_restore`). A critic that dies meanwhile is replaced from the last
        checkpoint and redoes the step; this waits for it."""
        p = self.pipeline
        assert p is not None
        target = version - getattr(self, "_critic_behind", 0)
        while True:
            ranks = list(self.workers["critic"])
            await p.wait_ready(*ranks)
            try:
                info = await ranks[0].get("/v1/info")
            except WorkerError:  # died: wait_ready waits for its replacement
                await asyncio.sleep(0.05)
                continue
            if int(info.get("policy_version", 0)) >= target:
                break
            await asyncio.sleep(0.05)
        await asyncio.gather(*(p.call(w, "save", params={"path": str(path)}) for w in ranks))

    def _checkpoint_dir(self, step: int) -> Path:
        return (self.cfg.run_dir / "checkpoints" / f"step_{step:06d}").resolve()

    def _prune_checkpoints(self) -> None:
        done = sorted((self.cfg.run_dir / "checkpoints").glob("step_*/controller_state.json"))
        for old in done[: -self.cfg.checkpoint.keep]:
            shutil.rmtree(old.parent, ignore_errors=True)

    def _summarize(self) -> dict[str, Any]:
        lines = [
            json.loads(x)
            for x in (self.cfg.run_dir / "metrics.jsonl").read_text().splitlines()
            if x.strip()
        ]
        evals = [x for x in lines if x.get("event") == "eval"]
        # a resumed run redoes the steps after its checkpoint: count each step once, as it was
        # last trained (the dead run's records stay in metrics.jsonl, before the "resumed" event)
        by_step = {int(x["step"]): x for x in lines if "event" not in x}
        steps = [by_step[k] for k in sorted(by_step)]
        timed = [x for x in steps if not x.get("recovered")]  # see recovered_step_record
        total_samples = sum(x["samples"] for x in timed)
        total_tokens = sum(x["response_tokens"] for x in timed)
        train_time = sum(x["step_time_s"] for x in timed)
        # one step's batch reward is noisy (64 samples): compare the first and last tenths
        window = max(1, len(steps) // 10)
        rewards = [x["reward_mean"] for x in steps]
        return {
            "steps": len(steps),
            "eval_accuracy_start": evals[0]["eval_accuracy"] if evals else None,
            "eval_accuracy_end": evals[-1]["eval_accuracy"] if evals else None,
            "reward_first": mean(rewards[:window]) if steps else None,
            "reward_last": mean(rewards[-window:]) if steps else None,
            "reward_window_steps": window,
            "samples_per_s": total_samples / train_time if train_time else math.nan,
            "tokens_per_s": total_tokens / train_time if train_time else math.nan,
            "train_time_s": train_time,
            "staleness_max": max((x["staleness_max"] for x in steps), default=0),
            "reward_failures": max((x.get("reward_failures", 0) for x in steps), default=0),
            "run_dir": str(self.cfg.run_dir),
            "pid": os.getpid(),
        }


def set_aside_earlier_run(run_dir: Path) -> Path | None:
    """A fresh run never writes into an earlier run's directory: mixing the two would mix their
    checkpoints (pruning would delete the new ones, ``--resume`` would load the old). The
    earlier run is renamed to ``NAME.old-YYYYmmdd-HHMMSS`` and kept whole; returns where."""
    earlier = ("config.json", "metrics.jsonl", "samples.jsonl", "checkpoints")
    if not any((run_dir / name).exists() for name in earlier):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    run_dir.rename(dest)
    print(
        f"{run_dir} held an earlier run: moved it to {dest} (to continue a run instead, "
        f"pass --resume {run_dir})",
        file=sys.stderr,
    )
    return dest


#: What a resumed run must keep: its checkpoint's index (groups of this shape, these tasks),
#: loader position (over this dataset, in this order) and trainer state (this model) depend on it.
FIXED_ON_RESUME = (
    "algorithm.name",
    "algorithm.prompts_per_step",
    "algorithm.samples_per_prompt",
    "model.path",
    "data.source",
    "data.train_size",
    "data.shuffle",
    "data.prompt_field",
    "data.answer_field",
    "data.on_bad_row",
    "data.max_prompt_chars",
    "run.seed",
)


def check_resumable(saved: Mapping[str, Any], cfg: Config) -> None:
    """Refuse to resume with a setting the checkpoint cannot follow (it would wait forever for
    groups of a new shape, or load a different dataset's positions); name each one."""
    now = cfg.to_json()

    def get(tree: Mapping[str, Any], key: str) -> Any:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    changed = [
        f"{key}: {get(saved, key)!r} -> {get(now, key)!r}"
        for key in FIXED_ON_RESUME
        if get(saved, key) is not None and get(saved, key) != get(now, key)
    ]
    kl_then = float(get(saved, "algorithm.kl_coef") or 0.0) > 0
    if kl_then != (cfg.algorithm.kl_coef > 0):
        changed.append("algorithm.kl_coef: the KL penalty (a reference worker) turned on or off")
    if changed:
        raise ConfigError(
            "cannot resume with these settings changed (the checkpoint depends on them; start "
            "a new run instead):\n  " + "\n  ".join(changed)
        )


class NoCheckpoint(ValueError):
    """``--resume`` of a run directory that holds no complete checkpoint."""


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The controller state of the newest complete checkpoint of a run."""
    done = sorted((run_dir / "checkpoints").glob("step_*/controller_state.json"))
    if not done:
        raise NoCheckpoint(
            f"{run_dir}: no complete checkpoint to resume from. A run saves one every "
            "checkpoint.every steps (0, the default: only at the end) and when it is stopped "
            "with SIGTERM; a run killed before any was saved must start again (without "
            "--resume). Set checkpoint.every=N for runs that must survive a kill."
        )
    state: dict[str, Any] = json.loads(done[-1].read_text())
    return state


T = TypeVar("T")


async def _all_or_none(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Like ``gather``, but the first failure cancels the others (PPO's actor and critic steps:
    one failing must not leave the other running unowned) and is raised as itself."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [t.result() for t in tasks]


async def _first_failure(main: Awaitable[T], side: asyncio.Task[Any] | None) -> T:
    """``await main``, but raise at once if ``side`` (already running) fails first; ``main``
    is then cancelled. ``side`` is left to the caller (awaited, or cancelled)."""
    fut = asyncio.ensure_future(main)
    if side is None:
        return await fut
    try:
        await asyncio.wait({fut, side}, return_when=asyncio.FIRST_EXCEPTION)
        if not fut.done() and side.done() and not side.cancelled():
            error = side.exception()
            if error is not None:
                raise error
        return await fut
    finally:
        if not fut.done():
            fut.cancel()
            with contextlib.suppress(BaseException):
                await fut


def _stage_times(log: RunLog, since: float, until: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in log.spans:
        if s.end >= since and s.start <= until:
            out[s.stage] = out.get(s.stage, 0.0) + (min(s.end, until) - max(s.start, since))
    return {k: round(v, 4) for k, v in out.items()}
