"""The small typed protocols every engine adapter implements.

The controller and the workers only ever talk to these; which implementation runs is chosen by
config (``rollout.engine: vllm | transformers``), never by importing a concrete engine directly.
Token ids go in and out: tokenisation belongs to the task, not to the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Sampling parameters of one generation request."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    ignore_eos: bool = False  # keep sampling past EOS up to max_new_tokens (benchmarks, tests)


@dataclass(slots=True)
class Completion:
    """One sampled response: its token ids and the behaviour policy's log-prob of each token."""

    token_ids: list[int]
    logprobs: list[float]  # same length as token_ids; log p(token | prefix) under the engine
    finish_reason: str  # "stop" (EOS) | "length" (max_new_tokens) | "abort"
    policy_version: int  # the weights version that generated this completion


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates completions from prompt token ids; many requests may be in flight at once."""

    @property
    def policy_version(self) -> int: ...

    async def start(self) -> None: ...

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingConfig
    ) -> Completion: ...

    async def abort(self, request_id: str) -> None: ...

    async def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights in place (between engine steps) and serve ``version`` from now on."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class TrainBatch:
    """A padded batch for the training engine. Shapes: B rows, T = prompt + response tokens."""

    input_ids: torch.Tensor  # (B, T) int64, right-padded
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens
    loss_mask: torch.Tensor  # (B, T) float32, 1 on response tokens that enter the loss
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, T) per-token extras


@dataclass(frozen=True, slots=True)
class LossContext:
    """What a loss function needs to know about the whole optimizer step, not just its
    micro-batch: counts over every micro-batch on every data-parallel rank, so that summing the
    per-micro-batch losses gives the mean over the global batch."""

    global_tokens: float  # sum of loss_mask over all micro-batches and ranks
    global_sequences: int  # rows with at least one loss token, over all micro-batches and ranks
    world_size: int = 1
    step: int = 0  # optimizer steps taken before this one


@runtime_checkable
class LossFn(Protocol):
    """The ``loss_fn`` that ``TrainingEngine.accumulate`` calls once per micro-batch.

    ``outputs`` holds the engine's forward results for the micro-batch, (B, T) aligned to
    input positions: ``logprobs`` (and ``entropy`` when the callable has a true attribute
    ``needs_entropy``; with a graph unless it has a false attribute ``entropy_grad``) for a
    policy, ``values`` for a critic. Returns this micro-batch's share of
    the global loss and float metrics averaged over its loss tokens (keys ending in ``_max`` /
    ``_min`` are reduced by max / min).
    """

    def __call__(
        self, outputs: dict[str, torch.Tensor], batch: TrainBatch, ctx: LossContext
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


@runtime_checkable
class TrainingEngine(Protocol):
    """Takes optimizer steps on a loss, streamed: a
    step's micro-batches arrive one at a time (the trainer starts on a step's first
    micro-batch before its last one is generated), so the step's loss context -- its global
    counts -- is fixed when it begins (see :class:`LossContext`)."""

    @property
    def step(self) -> int:
        """Optimizer steps taken: the policy version of the current weights."""
        ...

    @property
    def world_size(self) -> int:
        """Data-parallel ranks (each calls :meth:`finish_step` for every step)."""
        ...

    def begin_step(self, ctx: LossContext) -> None:
        """Start an optimizer step: fresh gradients; ``ctx`` is every micro-batch's context."""
        ...

    def accumulate(self, micro_batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        """Forward/backward one micro-batch; its gradients add to the step's."""
        ...

    def finish_step(self) -> dict[str, float]:
        """Sum gradients over ranks, clip, take the optimizer step; scalar metrics."""
        ...

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]: ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...


@runtime_checkable
class PolicyEngine(TrainingEngine, Protocol):
    """A language model: the actor (trained) and the reference (never trained)."""

    def logprobs(self, batch: TrainBatch, with_entropy: bool = False) -> dict[str, torch.Tensor]:
        """Per-token log p(x_t | x_<t) aligned to input_ids positions: ``logprobs`` (B, T),
        position 0 is 0; optionally ``entropy`` (B, T)."""
        ...


@runtime_checkable
class ValueEngine(TrainingEngine, Protocol):
    """A critic: a training engine that also predicts per-token values."""

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """(B, T) value estimates aligned to input positions."""
        ...


class RewardFunction(Protocol):
    """Scores one response. May be sync or async; raising or timing out is a recorded failure."""

    def __call__(self, prompt: str, response: str, answer: str) -> float: ...


__all__ = [
    "Completion",
    "LossContext",
    "LossFn",
    "PolicyEngine",
    "RewardFunction",
    "RolloutEngine",
    "SamplingConfig",
    "TrainBatch",
    "TrainingEngine",
    "ValueEngine",
]
