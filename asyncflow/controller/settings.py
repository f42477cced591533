"""What each worker role is told at start-up, derived from the run's config tree.

One pure function, :func:`role_settings`, used by the controller when it spawns workers and by
the worker CLI (``python -m asyncflow.workers --role ROLE --config X.yaml [overrides]``) when a
worker is started by hand and attached by URL. Both sides building the settings with the same
function is what keeps an attached worker in agreement with the controller (same model, engine,
sampling, loss and data settings).

Process placement (CPU pinning of spawned workers, data-parallel ranks) is not a setting of the
run and stays with whoever starts the process.
"""

from __future__ import annotations

from typing import Any

from asyncflow.config import Config

#: the roles a run can have, in start-up order
ROLES = ("rollout", "reward", "actor", "reference", "critic")


def role_settings(cfg: Config) -> dict[str, dict[str, Any]]:
    """The settings of every worker role (JSON-ready), keyed by role name."""
    common: dict[str, Any] = {"model": cfg.model.path, "seed": cfg.run.seed}
    data = cfg.data.model_dump()
    data["max_prompt_tokens"] = max(cfg.model.max_model_len - cfg.rollout.max_new_tokens, 1)
    # the trainer roles score log-probs at the rollout temperature (0 means greedy: use 1)
    trainer: dict[str, Any] = {"temperature": cfg.rollout.temperature or 1.0}
    alg = cfg.algorithm
    loss = {
        "old_policy": alg.old_policy,
        "clip_low": alg.clip_low,
        "clip_high": alg.clip_high,
        "dual_clip": alg.dual_clip,
        "importance_mode": alg.importance_mode,
        "importance_cap": alg.importance_cap,
        "kl_coef": alg.kl_coef,
        "kl_estimator": alg.kl_estimator,
        "entropy_coef": alg.entropy_coef,
    }
    return {
        "rollout": {
            **common,
            "engine": cfg.rollout.engine,
            "step_ordered": cfg.rollout.step_ordered,
            "vllm": cfg.rollout.vllm.model_dump(),
            "max_model_len": cfg.model.max_model_len,
            "data": data,
            "eval": cfg.eval.model_dump(),
            "sampling": {
                "max_new_tokens": cfg.rollout.max_new_tokens,
                "temperature": cfg.rollout.temperature,
                "top_p": cfg.rollout.top_p,
                "top_k": cfg.rollout.top_k,
            },
        },
        "reward": {
            **common,
            "data": data,
            "function": cfg.reward.function,
            "timeout_s": cfg.reward.timeout_s,
            "on_failure": cfg.reward.on_failure,
            "normalize_std": alg.normalize_std,
        },
        "actor": {
            **common,
            **trainer,
            **cfg.actor.model_dump(exclude={"urls", "workers"}),
            "loss": loss,
            "skip_zero_advantage": alg.skip_zero_advantage,
        },
        "reference": {**common, **trainer, "threads": cfg.reference.threads},
        "critic": {
            **common,
            **trainer,
            **cfg.critic.model_dump(exclude={"urls", "workers"}),
            "gamma": alg.gamma,
            "lam": alg.lam,
            "whiten_advantages": (
                not alg.streaming if alg.whiten_advantages is None else alg.whiten_advantages
            ),
        },
    }
