"""Training one step of one trainer role over its ranks: micro-batches in, one optimizer step.

A step's micro-batches are its groups in the role's training task, which the index partitions
by ``step``: step s trains exactly the prompts admitted for step s, even when step s + 1's rows
are ready first. Each micro-batch is dealt, as soon as it is ready, to the next rank
(round-robin) for a forward/backward -- streaming, ``micro_batch_groups`` groups at a time;
without streaming, the whole step at once, cut into micro-batches -- and once every one is in,
every rank takes one optimizer step (``finish``). The loss divides by a fixed normaliser known
before the step's last row is (rows x max new tokens): the streamed micro-batch losses then sum
to exactly the full batch's loss.

A step is tried as a whole (:meth:`Training.attempt`): its rows stay leased until the block that
trains them succeeds -- the optimizer step and, for the actor, the commit the step driver makes
inside it -- and are then acked; any failure gives every one back, so the step is redone from
scratch once the failed worker is replaced and each sample enters exactly one update. Attempts
are numbered: a rank drops a late micro-batch of an older (step, attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from asyncflow.config import Config
from asyncflow.controller.concurrency import all_of, task_group
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.pool import WorkerHandle
from asyncflow.roles.dataflow import Task
from asyncflow.roles.ops import FinishResult
from asyncflow.runlog import RunLog, Span
from asyncflow.transfer.index import BatchMeta, SampleIndex


class Training:
    """Steps of the trainer roles (the actor; with PPO also the critic), one try at a time."""

    def __init__(self, cfg: Config, index: SampleIndex, fleet: Fleet, log: RunLog) -> None:
        self.cfg = cfg
        self.index = index
        self.fleet = fleet
        self.log = log

    def loss_context(self) -> dict[str, Any]:
        """A fixed normaliser (rows x max new tokens), known before the step's last row is:
        streamed micro-batch losses then sum to exactly the full batch's loss."""
        rows = self.cfg.rows_per_step
        return {"global_tokens": rows * self.cfg.rollout.max_new_tokens, "global_sequences": rows}

    @contextlib.asynccontextmanager
    async def attempt(self, task: Task, step: int, number: int) -> AsyncIterator[StepAttempt]:
        """Try step ``step`` of ``task`` once (the ``number``-th retry), on the role's ranks
        once none of them is being replaced. The rows it takes are acked when the block
        succeeds and all given back when it fails; a failing micro-batch fails the block."""
        await self.fleet.wait_ready(*self.fleet.workers[task.role])
        attempt = StepAttempt(self, task, step, list(self.fleet.workers[task.role]), number)
        try:
            async with task_group() as micro_batches:
                attempt.micro_batches = micro_batches
                yield attempt
        except BaseException:
            self._settle(attempt, trained=False)
            raise
        for w in attempt.ranks:
            end = self.log.now()
            self.log.span(Span(w.name, f"{task.name}-step", attempt.finished, end, 0, step, step))
        self._settle(attempt, trained=True)

    def _settle(self, attempt: StepAttempt, trained: bool) -> None:
        """The one place a training step's rows leave their lease: acked once the step is
        trained (and committed), else given back, to be trained again."""
        for batch in attempt.batches:
            if trained:
                stale = self.index.ack(attempt.task.name, batch.rows, lease=batch.lease)
                if stale:  # taken from this lease meanwhile: they will be handed out again
                    self.log.metrics(
                        {
                            "event": "ack_refused",
                            "task": attempt.task.name,
                            "step": attempt.step,
                            "rows": stale,
                            "time_s": self.log.now(),
                        }
                    )
            else:
                self.index.requeue(
                    attempt.task.name, batch.rows, only_leased=True, lease=batch.lease
                )


class StepAttempt:
    """One try of one trainer role's step (see :meth:`Training.attempt`)."""

    def __init__(
        self, training: Training, task: Task, step: int, ranks: list[WorkerHandle], number: int
    ) -> None:
        self.t = training
        self.task = task
        self.step = step
        self.ranks = ranks
        self.params = {
            "step": step,
            "attempt": number,
            "columns": [*task.loss_columns],
            **training.loss_context(),
        }
        self.batches: list[BatchMeta] = []  #: what it leased, micro-batches or whole steps
        self.records: list[dict[str, Any]] = []  #: its sample records, once finished
        self.finished = 0.0  #: when the optimizer step was asked for (run time)
        self.micro_batches: asyncio.TaskGroup | None = None
        self._micro: list[asyncio.Task[None]] = []

    async def ready(self) -> AsyncIterator[BatchMeta]:
        """The step's micro-batches, each as soon as the stages have made it ready."""
        alg = self.t.cfg.algorithm
        per_batch = alg.micro_batch_groups if alg.streaming else alg.prompts_per_step
        taken = 0
        while taken < alg.prompts_per_step:
            k = min(per_batch, alg.prompts_per_step - taken)
            batch = await self.t.index.get_batch(self.task.name, k, partition=self.step)
            self.batches.append(batch)
            taken += k
            for part in [batch] if alg.streaming else split(batch, alg.micro_batch_groups):
                yield part

    def accumulate(self, micro: BatchMeta) -> None:
        """Start ``micro``'s forward/backward on the next rank (round-robin), in the background."""
        assert self.micro_batches is not None
        i = len(self._micro)
        rank = self.ranks[i % len(self.ranks)]
        name = f"{self.task.name}-micro-{self.step}-{i}"
        self._micro.append(self.micro_batches.create_task(self._train(rank, micro), name=name))

    async def finish(self) -> list[FinishResult]:
        """Once every micro-batch is in, one optimizer step on every rank; their answers."""
        await asyncio.gather(*self._micro)
        self.finished = self.t.log.now()
        fleet, name = self.t.fleet, f"{self.task.name}-finish-{self.step}"
        outs = await all_of(
            (f"{name}-{w.name}", fleet.op(w, FinishResult, "finish", params=self.params))
            for w in self.ranks
        )
        self.records = [r for b in self.batches for r in sample_records(self.step, b)]
        return outs

    def ranks_lost(self) -> bool:
        """Whether a rank that took this step died (or was replaced) since."""
        return not self.t.fleet.serving(self.task.role, self.ranks)

    async def _train(self, worker: WorkerHandle, batch: BatchMeta) -> None:
        log = self.t.log
        start = log.now()
        await self.t.fleet.call(worker, "train_micro", batch, self.params)
        step = self.step
        log.span(Span(worker.name, self.task.name, start, log.now(), len(batch.rows), step, step))


def sample_records(step: int, batch: BatchMeta) -> list[dict[str, Any]]:
    """``samples.jsonl``'s records of a trained batch (from the rows' metadata)."""
    return [
        {
            "step": step,
            "row": r,
            "group": g,
            "index": meta["index"],
            "sample": meta["sample"],
            "version": int(meta.get("version", -1)),
            "reward": float(meta.get("reward", float("nan"))),
            "length": meta.get("length"),
        }
        for r, g, meta in zip(batch.rows, batch.groups, batch.meta)
    ]


def split(batch: BatchMeta, groups_per_part: int) -> list[BatchMeta]:
    """Cut a batch of whole groups into parts of ``groups_per_part`` groups (each part serves
    the batch's lease)."""
    order: list[int] = []
    for g in batch.groups:
        if not order or order[-1] != g:
            order.append(g)
    parts = []
    for i in range(0, len(order), groups_per_part):
        keep = set(order[i : i + groups_per_part])
        ix = [j for j, g in enumerate(batch.groups) if g in keep]
        parts.append(
            BatchMeta(
                batch.task,
                [batch.rows[j] for j in ix],
                [batch.groups[j] for j in ix],
                {c: [f[j] for j in ix] for c, f in batch.fields.items()},
                [batch.meta[j] for j in ix],
                batch.lease,
            )
        )
    return parts
