"""RL algorithms as pure tensor math: advantage estimators (GRPO, GAE), PPO losses with
off-policy correction, and the loss callables the training engine calls per micro-batch."""

from asyncflow.algorithms.advantages import (
    broadcast_to_tokens,
    final_token_rewards,
    gae_advantages,
    grpo_advantages,
    masked_whiten,
)
from asyncflow.algorithms.losses import (
    PolicyLossConfig,
    aggregate,
    importance_weights,
    kl_penalty,
    policy_loss,
    value_loss,
)
from asyncflow.algorithms.objectives import PolicyObjective, ValueObjective

__all__ = [
    "PolicyLossConfig",
    "PolicyObjective",
    "ValueObjective",
    "aggregate",
    "broadcast_to_tokens",
    "final_token_rewards",
    "gae_advantages",
    "grpo_advantages",
    "importance_weights",
    "kl_penalty",
    "masked_whiten",
    "policy_loss",
    "value_loss",
]
