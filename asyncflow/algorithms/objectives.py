"""Loss callables for ``TrainingEngine.accumulate``: they bind TrainBatch columns to the losses.

The column names below are the contract between the data plane and the trainer: every per-token
column is (B, T) float32 aligned to input positions (column ``t`` belongs to token ``x_t``), the
same alignment as the training engine's ``logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from asyncflow.algorithms.losses import Aggregation, PolicyLossConfig, policy_loss, value_loss
from asyncflow.engines.protocols import LossContext, TrainBatch

ADVANTAGES = "advantages"  # (B, T) per-token advantages
OLD_LOGPROBS = "old_logprobs"  # (B, T) trainer's log-probs before this step (proximal policy)
ROLLOUT_LOGPROBS = "rollout_logprobs"  # (B, T) behaviour policy (rollout engine) log-probs
REF_LOGPROBS = "ref_logprobs"  # (B, T) frozen reference model log-probs
VALUES = "values"  # (B, T) critic values when the batch was taken (old values)
RETURNS = "returns"  # (B, T) value targets


@dataclass(slots=True)
class PolicyObjective:
    """The actor's loss: :func:`policy_loss` over a micro-batch's columns.

    Needs ``advantages``; uses ``old_logprobs`` if present, else ``rollout_logprobs`` as the old
    policy, else the current log-probs detached (a single on-policy step); ``rollout_logprobs``
    is the behaviour policy; ``ref_logprobs`` is needed only when ``kl_coef != 0``.
    """

    config: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    report_entropy: bool = True  # compute the entropy for metrics even without a bonus
    #: the proximal ("old") policy of the PPO ratio when no ``old_logprobs`` column is given:
    #: "current" = the trainer's own weights before this step (detached; with one optimizer step
    #: per batch that is exact, costs no extra forward, and lets the truncated importance weight
    #: exp(old - behaviour) correct for staleness -- decoupled PPO), or "behaviour" = the
    #: rollout engine's log-probs (classic PPO; the importance weight is then always 1).
    old_policy: str = "current"

    @property
    def needs_entropy(self) -> bool:
        """Whether the engine must return ``entropy`` in the outputs."""
        return self.report_entropy or self.config.entropy_coef != 0.0

    @property
    def entropy_grad(self) -> bool:
        """Whether the entropy enters the loss (else the engine computes it without a graph)."""
        return self.config.entropy_coef != 0.0

    def __call__(
        self, outputs: dict[str, torch.Tensor], batch: TrainBatch, ctx: LossContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logprobs = outputs["logprobs"]  # (B, T)
        cols = batch.tensors
        if ADVANTAGES not in cols:
            raise ValueError(f"policy loss needs the '{ADVANTAGES}' column")
        behaviour = cols.get(ROLLOUT_LOGPROBS)
        old = cols.get(OLD_LOGPROBS)
        if old is None:
            old = behaviour if self.old_policy == "behaviour" else None
        if old is None:
            old = logprobs.detach()
        ref = cols.get(REF_LOGPROBS)
        if self.config.kl_coef != 0.0 and ref is None:
            raise ValueError(f"kl_coef != 0 needs the '{REF_LOGPROBS}' column")
        return policy_loss(
            logprobs,
            old,
            cols[ADVANTAGES],
            batch.loss_mask,
            self.config,
            behaviour_logprobs=behaviour,
            ref_logprobs=ref,
            entropy=outputs.get("entropy"),
            global_tokens=ctx.global_tokens,
            global_sequences=ctx.global_sequences,
        )


@dataclass(slots=True)
class ValueObjective:
    """The critic's loss: :func:`value_loss` of ``outputs['values']`` against ``returns``.

    ``values`` (the critic's values when the batch was taken) anchors the clipping; without it
    the loss is the plain squared error.
    """

    clip_range: float | None = 0.2
    aggregation: Aggregation = "token-mean"

    def __call__(
        self, outputs: dict[str, torch.Tensor], batch: TrainBatch, ctx: LossContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        values = outputs["values"]  # (B, T)
        cols = batch.tensors
        if RETURNS not in cols:
            raise ValueError(f"value loss needs the '{RETURNS}' column")
        old = cols.get(VALUES)
        clip = self.clip_range if old is not None else None
        return value_loss(
            values,
            values.detach() if old is None else old,
            cols[RETURNS],
            batch.loss_mask,
            clip_range=clip,
            aggregation=self.aggregation,
            global_tokens=ctx.global_tokens,
            global_sequences=ctx.global_sequences,
        )


__all__ = [
    "ADVANTAGES",
    "OLD_LOGPROBS",
    "REF_LOGPROBS",
    "RETURNS",
    "ROLLOUT_LOGPROBS",
    "VALUES",
    "PolicyObjective",
    "ValueObjective",
]
