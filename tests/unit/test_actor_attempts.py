"""The actor's streamed step against leftovers of an abandoned attempt: a micro-batch of an
older (step, attempt) -- its HTTP call was cancelled by the controller, not its handler -- must
neither wipe nor join the retried attempt's gradients."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from asyncflow.roles.ops import PathParams, TrainMicroParams
from asyncflow.transfer.service import BadRequest
from asyncflow.workers.trainer import ActorRole


class Engine:
    """Records which micro-batches each optimizer step accumulated."""

    world_size = 1

    def __init__(self) -> None:
        self.step = 0
        self.acc: list[str] = []

    def begin_step(self, ctx: Any) -> None:
        self.acc = []

    def accumulate(self, batch: Any, loss_fn: Any) -> dict[str, float]:
        self.acc.append(batch.tag)
        return {}

    def finish_step(self) -> dict[str, Any]:
        self.step += 1
        return {"trained": list(self.acc)}

    def load(self, path: str) -> None:
        self.step = 3


def request(step: int, attempt: int, tag: str = "", delay: float = 0.0) -> Any:
    params = {"step": step, "attempt": attempt, "global_tokens": 10, "global_sequences": 4}
    return SimpleNamespace(params=TrainMicroParams(**params, columns=[]), tag=tag, delay=delay)


@pytest.fixture
def role() -> ActorRole:
    r = ActorRole({"skip_zero_advantage": False})
    r.engine = Engine()  # type: ignore[assignment]

    async def pull(req: Any, op: str, extra: tuple[str, ...] = ()) -> Any:
        await asyncio.sleep(req.delay)  # pulling the rows from other workers
        return SimpleNamespace(tag=req.tag, input_ids=torch.zeros(2, 3), tensors={})

    r._batch = pull  # type: ignore[method-assign]
    return r


async def test_a_leftover_of_an_abandoned_attempt_is_refused(role: ActorRole) -> None:
    stale = asyncio.create_task(role.train_micro(request(5, 0, "A0", delay=0.05)))
    await role.train_micro(request(5, 1, "B1"))  # the controller retried the step meanwhile
    await role.train_micro(request(5, 1, "C1"))
    with pytest.raises(BadRequest) as refused:
        await stale
    assert refused.value.status == 409
    await role.train_micro(request(5, 1, "D1"))
    out = await role.finish(request(5, 1))
    assert out["metrics"]["trained"] == ["B1", "C1", "D1"] and out["version"] == 1
    with pytest.raises(BadRequest):  # a finish of the abandoned attempt steps nothing
        await role.finish(request(5, 0))
    assert role.engine.step == 1


async def test_next_steps_and_a_loaded_checkpoint_start_afresh(
    role: ActorRole, tmp_path: Path
) -> None:
    await role.train_micro(request(7, 2, "X"))
    assert (await role.finish(request(7, 2)))["metrics"]["trained"] == ["X"]
    await role.train_micro(request(8, 0, "Y"))  # the next step, first attempt: accepted
    assert (await role.finish(request(8, 0)))["metrics"]["trained"] == ["Y"]
    # a resumed controller loads an earlier checkpoint into this (attached) actor and counts
    # from its step again
    assert (await role.load(SimpleNamespace(params=PathParams(path=str(tmp_path)))))["version"] == 3
    await role.train_micro(request(3, 0, "Z"))
    assert (await role.finish(request(3, 0)))["metrics"]["trained"] == ["Z"]
