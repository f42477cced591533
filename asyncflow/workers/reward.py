"""The ``reward`` role: scores responses and turns group rewards into GRPO advantages.

================  ===================================  ========================================
op                consumes                             produces (in this unit)
================  ===================================  ========================================
``score``         ``response_ids`` (any unit); meta    ``reward`` float32 scalar per row; a
                  ``index`` names the dataset answer   failed call (raised, timed out) scores 0
                                                       and is reported, never crashes the worker
``advantages``    whole groups' ``reward``             ``advantages`` float32 scalar per row
                                                       (GRPO: group-normalised)
``score_groups``  whole groups' ``response_ids``       both of the above in one call: what
                                                       the GRPO pipeline runs
================  ===================================  ========================================
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import torch

from asyncflow.algorithms.advantages import grpo_advantages
from asyncflow.rewards.functions import RewardScorer
from asyncflow.roles.ops import NoParams, Produced, ScoreMetrics, ScoreResult, WorkResult, wire
from asyncflow.roles.settings import RewardSettings, parse_settings
from asyncflow.tasks.sources import prompt_row, resolve_model, reward_spec, train_source
from asyncflow.workers.server import Op, WorkRequest, need_batch


class RewardRole:
    name = "reward"

    def __init__(self, settings: RewardSettings | Mapping[str, Any]) -> None:
        """``settings``: typed, or a (partial) mapping over the default config's."""
        self.settings = s = cast(RewardSettings, parse_settings("reward", settings))
        self.model_dir = str(resolve_model(s.model))
        self.train = train_source(s.data, s.seed, self.model_dir)
        spec, trusted = reward_spec(s.function)
        self.scorer = RewardScorer(
            spec,
            timeout_s=s.timeout_s,
            isolate=not trusted,
            num_workers=s.processes,
            failure_policy=s.on_failure,
        )
        self.normalize_std = s.normalize_std
        self.tokenizer: Any = None
        self.scored = 0
        self.failures = 0

    async def start(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)
        await self.scorer.start()

    def ops(self) -> Mapping[str, Op]:
        return {
            "score": self.score,
            "advantages": self.advantages,
            "score_groups": self.score_groups,
        }

    def info(self) -> dict[str, Any]:
        return {"scored": self.scored, "failures": self.failures}

    async def close(self) -> None:
        await self.scorer.aclose()

    async def score(self, req: WorkRequest[NoParams]) -> dict[str, Any]:
        return wire((await self._score(req))[1])

    async def _score(self, req: WorkRequest[NoParams]) -> tuple[torch.Tensor, ScoreResult]:
        batch = need_batch(req.batch, "score", ["response_ids"])
        cols = await req.client.fetch(batch, ["response_ids"])
        responses = cols["response_ids"].data.split()
        texts = self.tokenizer.batch_decode(
            [r.tolist() for r in responses], skip_special_tokens=True
        )
        rows = [prompt_row(self.train, m) for m in batch.meta]
        results = await self.scorer.score_many(
            [(r.prompt, t, r.answer) for r, t in zip(rows, texts)]
        )
        rewards = torch.tensor([r.score for r in results], dtype=torch.float32)
        req.unit.put("reward", batch.rows, rewards)
        failed = [(rid, (r.error or "")[:300]) for rid, r in zip(batch.rows, results) if r.failed]
        self.scored += len(results)
        self.failures += len(failed)
        metrics = ScoreMetrics.model_construct(
            rewards=rewards.tolist(), failed=failed, n_failed=len(failed)
        )
        produced = {"reward": Produced.of([[]] * len(batch.rows), "float32")}
        return rewards, ScoreResult.model_construct(produced=produced, metrics=metrics)

    async def score_groups(self, req: WorkRequest[NoParams]) -> dict[str, Any]:
        """``score`` then ``advantages`` on a batch of whole groups, in one call: what a GRPO
        stage needs, with one round trip per batch instead of two."""
        rewards, out = await self._score(req)
        out.produced.update((await self._advantages(req, rewards)).produced)
        return wire(out)

    async def advantages(self, req: WorkRequest[NoParams]) -> dict[str, Any]:
        return wire(await self._advantages(req, None))

    async def _advantages(
        self, req: WorkRequest[NoParams], rewards: torch.Tensor | None
    ) -> WorkResult:
        batch = need_batch(req.batch, "advantages", [] if rewards is not None else ["reward"])
        if rewards is None:
            cols = await req.client.fetch(batch, ["reward"])
            rewards = cols["reward"].stacked()  # (B,)
        by_group: dict[int, list[int]] = {}
        for i, g in enumerate(batch.groups):
            by_group.setdefault(g, []).append(i)
        sizes = {len(ix) for ix in by_group.values()}
        adv = torch.empty_like(rewards)
        if len(sizes) == 1:  # the common case: equal groups, one vectorised call
            order = [i for ix in by_group.values() for i in ix]
            grid = rewards[order].view(len(by_group), -1)  # (G, n)
            adv[order] = grpo_advantages(grid, normalize_std=self.normalize_std).reshape(-1)
        else:
            for ix in by_group.values():
                adv[ix] = grpo_advantages(
                    rewards[ix].view(1, -1), normalize_std=self.normalize_std
                ).reshape(-1)
        req.unit.put("advantages", batch.rows, adv)
        produced = {"advantages": Produced.of([[]] * len(batch.rows), "float32")}
        return WorkResult.model_construct(produced=produced)
