"""Held-out evaluation: the served policy's accuracy on the evaluation prompts.

The rollout worker in slot 0 generates greedily for the evaluation set (``eval.*``) and scores
with the run's reward function; the controller writes an ``{"event": "eval"}`` line and hands
the ``eval_*`` values to the step record that follows. A run evaluates before its first step,
every ``eval.every`` steps (after that step's weight sync: the new policy is what is measured)
and after its last.

A call cut off by a dying worker is tried again once the supervisor has replaced it (and given
it the current weights); an error the worker answered with is not -- it would only repeat.
"""

from __future__ import annotations

import time
from typing import Any

from asyncflow.config import Config
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.pool import WorkerError
from asyncflow.controller.retry import Retry
from asyncflow.roles.ops import EvaluateResult
from asyncflow.runlog import RunLog


def _answered(error: BaseException) -> bool:
    """The worker answered with an error (or it is not a worker's): trying again would repeat."""
    return not isinstance(error, WorkerError) or error.status is not None


class Evaluation:
    """Evaluates on the rollout worker in slot 0, trying again after it is replaced."""

    def __init__(self, cfg: Config, fleet: Fleet, log: RunLog, retry: Retry) -> None:
        self.fleet = fleet
        self.log = log
        self.retry = retry
        self.params = {"reward": cfg.reward.function, "timeout_s": cfg.reward.timeout_s}

    async def run(self, step: int) -> dict[str, Any]:
        """Evaluate the policy the engines serve now (as of ``step`` steps trained); returns
        the ``eval_*`` values."""
        t0 = time.monotonic()

        async def attempt(_: int) -> EvaluateResult:
            # the current rollout worker of slot 0: a dead one is replaced by the supervisor
            # (and given the current weights) before the evaluation is tried again
            worker = self.fleet.handle("rollout", 0)
            await self.fleet.wait_ready(worker)
            return await self.fleet.op(worker, EvaluateResult, "evaluate", params=self.params)

        out = await self.retry.call(f"evaluation at step {step}", attempt, give_up=_answered)
        m = out.metrics
        rec = {
            "event": "eval",
            "step": step,
            "eval_accuracy": m.accuracy,
            "eval_mean_reward": m.mean_reward,
            "eval_n": m.n,
            "eval_version": m.version,
            "eval_s": time.monotonic() - t0,
        }
        self.log.metrics(rec)
        return {k: v for k, v in rec.items() if k.startswith("eval_")}
