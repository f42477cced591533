"""Sampling seeds of the rollout worker: a row's seed is the run's base plus its row id (a row
recomputed after a worker died draws the same sample), moved on for each regeneration of its
group (a failed reward must not be answered with the very same response)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from transformers import AutoTokenizer

from asyncflow.engines.protocols import Completion
from asyncflow.roles.ops import GenerateParams
from asyncflow.transfer.index import BatchMeta
from asyncflow.transfer.storage import StorageUnit
from asyncflow.workers.rollout import REGEN_SEED_STRIDE, RolloutRole


class SeedRecorder:
    def __init__(self) -> None:
        self.seeds: list[int | None] = []

    async def generate(self, rid: str, prompt_ids: list[int], sampling: Any) -> Completion:
        self.seeds.append(sampling.seed)
        return Completion([5, 6], [-0.5, -0.25], "stop", 0)


async def test_regenerated_rows_draw_new_seeds_and_recomputed_rows_the_same() -> None:
    role = RolloutRole({"engine": "transformers", "data": {"train_size": 16}})
    role.tokenizer = AutoTokenizer.from_pretrained(role.model_dir)
    engine = SeedRecorder()
    role.engine = engine  # type: ignore[assignment]
    meta = [
        {"index": 0, "step": 0, "sample": 0},
        {"index": 0, "step": 0, "sample": 1, "regenerated": 2},
    ]
    batch = BatchMeta("rollout", [10, 11], [3, 3], {}, meta)
    req = SimpleNamespace(
        batch=batch, params=GenerateParams(seed=7_000), unit=StorageUnit("rollout0")
    )
    await role.generate(req)  # type: ignore[arg-type]
    await role.generate(req)  # type: ignore[arg-type]
    assert engine.seeds == [7_010, 7_011 + 2 * REGEN_SEED_STRIDE] * 2
