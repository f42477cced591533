"""Policy-gradient and value losses: PPO clipping, off-policy correction, KL and entropy terms.

Pure tensor math, no I/O. Three policies meet in the policy loss under bounded staleness:

- the *behaviour* policy that generated the tokens (the rollout engine's log-probs, possibly
  ``k`` versions old);
- the *old* (proximal) policy, the trainer's weights when the step's batch was taken, against
  which PPO clips the ratio ``exp(logp - old_logp)``;
- the *current* policy being optimised (``logp``, with gradient).

The gap between behaviour and old is corrected with importance weights
``w = exp(old_logp - behaviour_logp)``, truncated at a cap (TIS) or with over-cap tokens masked
out, and applied (without gradient) to the per-token PG loss.

Aggregation divides by counts over the *global* batch (all micro-batches, all ranks), so
accumulating micro-batch gradients gives exactly the full-batch gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ImportanceMode = Literal["none", "truncate", "mask"]
KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token-mean", "seq-mean-token-mean"]


@dataclass(frozen=True, slots=True)
class PolicyLossConfig:
    """Settings of :func:`policy_loss`."""

    clip_low: float = 0.2  # ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    dual_clip: float | None = None  # for A < 0, cap the loss at -dual_clip * A (needs > 1)
    importance_mode: ImportanceMode = "truncate"  # off-policy correction behaviour -> old
    importance_cap: float = 2.0  # truncation cap (or masking threshold) of the weight
    kl_coef: float = 0.0  # coefficient of the KL(current || reference) penalty; 0 disables it
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0  # entropy bonus coefficient; 0 disables it
    aggregation: Aggregation = "token-mean"

    def __post_init__(self) -> None:
        if self.importance_mode not in ("none", "truncate", "mask"):
            raise ValueError(
                f"importance_mode must be none|truncate|mask, got {self.importance_mode}"
            )
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be k1|k2|k3, got {self.kl_estimator}")
        if self.aggregation not in ("token-mean", "seq-mean-token-mean"):
            raise ValueError(f"unknown aggregation {self.aggregation}")
        if self.importance_cap <= 0 or self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("importance_cap must be > 0 and clip ranges >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: Aggregation = "token-mean",
    global_tokens: float | None = None,
    global_sequences: int | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar, as this batch's share of a global mean.

    ``token-mean``: sum over masked tokens / ``global_tokens`` (default: this batch's count).
    ``seq-mean-token-mean``: each row's token mean, summed over rows / ``global_sequences``
    (default: rows here with at least one token). Summing the results of the micro-batches of a
    batch, given the batch's global counts, equals the result on the whole batch.
    """
    mask_f = mask.to(per_token.dtype)  # (B, T)
    masked = per_token * mask_f  # (B, T)
    if mode == "token-mean":
        denom = float(mask_f.sum().item()) if global_tokens is None else float(global_tokens)
        return masked.sum() / max(denom, 1.0)
    if mode == "seq-mean-token-mean":
        row_tokens = mask_f.sum(dim=1)  # (B,)
        row_means = masked.sum(dim=1) / row_tokens.clamp(min=1.0)  # (B,)
        if global_sequences is None:
            global_sequences = int((row_tokens > 0).sum().item())
        return row_means.sum() / max(float(global_sequences), 1.0)
    raise ValueError(f"unknown aggregation {mode}")


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(current || reference) from sampled tokens, (B, T) -> (B, T).

    With ``d = logp - ref_logp``: k1 = d (unbiased, high variance, can be negative);
    k2 = d^2 / 2; k3 = exp(-d) + d - 1 (unbiased, non-negative, low variance), clamped at 10.
    """
    diff = logprobs - ref_logprobs  # (B, T)
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        return (torch.exp(-diff) + diff - 1.0).clamp(max=10.0)
    raise ValueError(f"unknown KL estimator {estimator}")


def importance_weights(
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mode: ImportanceMode = "truncate",
    cap: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Off-policy weights ``w = exp(old_logp - behaviour_logp)`` per token, without gradient.

    ``none``: all ones. ``truncate`` (TIS): ``min(w, cap)``. ``mask``: ``w`` where ``w <= cap``,
    0 above (those tokens are rejected). Returns ``(weights, raw)``, both (B, T): the weights to
    apply and the untruncated ``w`` (for metrics).
    """
    raw = torch.exp((old_logprobs - behaviour_logprobs).detach().float())  # (B, T)
    if mode == "none":
        return torch.ones_like(raw), raw
    if mode == "truncate":
        return raw.clamp(max=cap), raw
    if mode == "mask":
        return torch.where(raw <= cap, raw, torch.zeros_like(raw)), raw
    raise ValueError(f"unknown importance mode {mode}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum().item() / max(float(mask.sum().item()), 1.0))


def _clipped_pg(
    ratio: torch.Tensor, advantages: torch.Tensor, cfg: PolicyLossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate per token and where clipping was active, both (B, T)."""
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)  # (B, T)
    loss = torch.maximum(unclipped, clipped)  # (B, T)
    was_clipped = clipped > unclipped  # (B, T)
    if cfg.dual_clip is not None:
        cap = -advantages * cfg.dual_clip  # (B, T)
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        was_clipped = was_clipped | dual
    return loss, was_clipped


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    behaviour_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    global_tokens: float | None = None,
    global_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped PG loss with off-policy correction, optional KL penalty and entropy bonus.

    All tensors are (B, T). ``behaviour_logprobs`` defaults to ``old_logprobs`` (on-policy:
    weights 1). Per token: ``w * max(-A r, -A clip(r)) + kl_coef * kl - entropy_coef * H`` with
    ``r = exp(logp - old_logp)``, aggregated by ``cfg.aggregation`` over the global counts.
    Metrics are means over this batch's masked tokens.
    """
    mask_f = mask.float()  # (B, T)
    old = old_logprobs.detach()
    behaviour = old if behaviour_logprobs is None else behaviour_logprobs.detach()
    log_ratio = logprobs - old  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg, was_clipped = _clipped_pg(ratio, advantages.detach(), cfg)  # (B, T)
    weights, raw = importance_weights(old, behaviour, cfg.importance_mode, cfg.importance_cap)
    per_token = weights * pg  # (B, T)
    metrics: dict[str, float] = {"pg_loss": _masked_mean(per_token.detach(), mask_f)}
    if ref_logprobs is not None and cfg.kl_coef != 0.0:
        kl = kl_penalty(logprobs, ref_logprobs.detach(), cfg.kl_estimator)  # (B, T)
        per_token = per_token + cfg.kl_coef * kl
        metrics["kl_loss"] = _masked_mean(kl.detach(), mask_f)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.detach(), mask_f)
        if cfg.entropy_coef != 0.0:
            per_token = per_token - cfg.entropy_coef * entropy
    loss = aggregate(per_token, mask_f, cfg.aggregation, global_tokens, global_sequences)
    metrics.update(_policy_metrics(logprobs, behaviour, ratio, was_clipped, weights, raw, mask_f))
    metrics["tis_truncated_frac"] = _masked_mean((raw > cfg.importance_cap).float(), mask_f)
    return loss, metrics


def _policy_metrics(
    logprobs: torch.Tensor,
    behaviour: torch.Tensor,
    ratio: torch.Tensor,
    was_clipped: torch.Tensor,
    weights: torch.Tensor,
    raw: torch.Tensor,
    mask_f: torch.Tensor,
) -> dict[str, float]:
    """Clip fraction, KL(behaviour || current) estimate and importance-weight statistics."""
    on = mask_f > 0  # (B, T)
    diff = (behaviour - logprobs.detach()).float()  # log(p_behaviour / p_current), (B, T)
    k3 = torch.exp(-diff) + diff - 1.0  # (B, T)
    any_token = bool(on.any().item())
    return {
        "clip_frac": _masked_mean(was_clipped.float(), mask_f),
        "approx_kl_behaviour": _masked_mean(k3, mask_f),
        "ratio_mean": _masked_mean(ratio.detach(), mask_f),
        "tis_weight_mean": _masked_mean(weights, mask_f),
        "tis_weight_max": float(raw[on].max().item()) if any_token else 1.0,
        "tis_weight_min": float(raw[on].min().item()) if any_token else 1.0,
    }


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
    aggregation: Aggregation = "token-mean",
    global_tokens: float | None = None,
    global_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``, all (B, T).

    ``V_clip = old_V + clamp(V - old_V, -clip_range, clip_range)``; ``clip_range=None`` gives
    the plain squared error. Aggregated like :func:`aggregate`.
    """
    mask_f = mask.float()  # (B, T)
    returns = returns.detach()
    err = (values - returns).square()  # (B, T)
    if clip_range is None:
        per_token = 0.5 * err
        clipped_frac = torch.zeros_like(err)
    else:
        old = old_values.detach()
        v_clip = old + (values - old).clamp(-clip_range, clip_range)  # (B, T)
        err_clip = (v_clip - returns).square()  # (B, T)
        per_token = 0.5 * torch.maximum(err, err_clip)
        clipped_frac = (err_clip > err).float()
    loss = aggregate(per_token, mask_f, aggregation, global_tokens, global_sequences)
    metrics = {
        "vf_loss": _masked_mean(per_token.detach(), mask_f),
        "vf_clip_frac": _masked_mean(clipped_frac, mask_f),
        "value_mean": _masked_mean(values.detach(), mask_f),
        "return_mean": _masked_mean(returns, mask_f),
    }
    return loss, metrics


__all__ = [
    "Aggregation",
    "ImportanceMode",
    "KLEstimator",
    "PolicyLossConfig",
    "aggregate",
    "importance_weights",
    "kl_penalty",
    "policy_loss",
    "value_loss",
]
