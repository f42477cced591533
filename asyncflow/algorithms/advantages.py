"""Advantage estimators: GRPO group normalisation and PPO's generalised advantage estimation.

Pure tensor math, no I/O. Per-token tensors are (B, T) and aligned to input positions the same
way as the training engine's log-probs: column ``t`` belongs to token ``x_t`` and the mask is 1 on
the response tokens that enter the loss (prompt positions and right padding are 0).
"""

from __future__ import annotations

import torch


def grpo_advantages(
    rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages: each reward minus its group's mean, optionally over its std.

    ``rewards`` is (G, n): G prompts, n samples each. A group whose rewards are all equal gets
    advantage 0 for every sample (there is nothing to learn from it). The std is the unbiased
    sample std (as in the GRPO paper); with ``n == 1`` every advantage is 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (G, n), got shape {tuple(rewards.shape)}")
    rewards = rewards.float()  # (G, n)
    n = rewards.shape[1]
    mean = rewards.mean(dim=1, keepdim=True)  # (G, 1)
    centred = rewards - mean  # (G, n)
    if n < 2:
        return torch.zeros_like(rewards)
    std = rewards.std(dim=1, keepdim=True, unbiased=True)  # (G, 1)
    # A zero-variance group: make the result exactly 0 instead of rounding noise over eps. A
    # subnormal std (rewards that differ by ~1e-45) counts as zero: dividing by it is noise.
    flat = std < torch.finfo(rewards.dtype).tiny  # (G, 1)
    centred = torch.where(flat, torch.zeros_like(centred), centred)
    if not normalize_std:
        return centred
    return centred / torch.where(flat, torch.ones_like(std), std + eps)  # (G, n)


def broadcast_to_tokens(per_sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spread one value per sequence over that sequence's response tokens.

    ``per_sequence`` is (B,) (e.g. GRPO advantages flattened from (G, n) row-major), ``mask`` is
    (B, T); the result is (B, T) float32 with zeros where the mask is 0.
    """
    if per_sequence.dim() != 1 or per_sequence.shape[0] != mask.shape[0]:
        raise ValueError(
            f"per_sequence must be (B,) with B={mask.shape[0]}, got {tuple(per_sequence.shape)}"
        )
    return per_sequence.float()[:, None] * mask.float()  # (B, T)


def final_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's scalar score on its last response token (the rest are 0).

    ``scores`` (B,), ``mask`` (B, T) -> (B, T). A row with no response token gets no reward.
    """
    mask_f = mask.float()  # (B, T)
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last = torch.where(mask_f > 0, positions, -1).max(dim=1).values  # (B,)
    out = torch.zeros_like(mask_f)  # (B, T)
    rows = torch.nonzero(last >= 0).squeeze(1)  # (B',)
    out[rows, last[rows]] = scores.float()[rows]
    return out


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked (response) positions of each row.

    ``rewards`` is (B, T) per-token rewards (use :func:`final_token_rewards` for one score per
    sequence) or (B,) which is placed on the last response token. ``values`` (B, T) is the
    critic's value of the state before each token. Masked-out positions are skipped: the
    recursion runs over the response tokens only, so right padding (and the prompt) neither
    contribute nor bootstrap; the value after the last response token is 0 (terminal).

    Returns ``(advantages, returns)``, both (B, T) float32, zero outside the mask, with
    ``returns = advantages + values`` on the mask.
    """
    mask_f = mask.float()  # (B, T)
    if rewards.dim() == 1:
        rewards = final_token_rewards(rewards, mask)
    rewards = rewards.float() * mask_f  # (B, T)
    values = values.float().detach() * mask_f  # (B, T)
    batch, length = mask_f.shape
    next_value = torch.zeros(batch, device=mask.device)  # (B,)
    running = torch.zeros(batch, device=mask.device)  # (B,)
    advantages = torch.zeros_like(mask_f)  # (B, T)
    for t in reversed(range(length)):
        on = mask_f[:, t] > 0  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        candidate = delta + gamma * lam * running  # (B,)
        running = torch.where(on, candidate, running)
        next_value = torch.where(on, values[:, t], next_value)
        advantages[:, t] = torch.where(on, candidate, torch.zeros_like(candidate))
    returns = (advantages + values) * mask_f  # (B, T)
    return advantages, returns


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``values`` (B, T) to zero mean and unit variance over the masked tokens.

    With ``shift_mean=False`` the mean is added back (only the scale changes). Positions outside
    the mask are returned as 0.
    """
    mask_f = mask.float()  # (B, T)
    count = mask_f.sum().clamp(min=1.0)
    mean = (values * mask_f).sum() / count
    var = (((values - mean) ** 2) * mask_f).sum() / count
    whitened = (values - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask_f


__all__ = [
    "broadcast_to_tokens",
    "final_token_rewards",
    "gae_advantages",
    "grpo_advantages",
    "masked_whiten",
]
