"""What each worker role is told at start-up: typed settings made from the run's config tree.

Both sides of the process boundary use these models. The controller builds them with
:func:`role_settings` and sends them as JSON (``--settings``); the worker validates the JSON back
into the same model (:func:`parse_settings`: an unknown or mistyped key fails its start naming
the key) and reads attributes. A worker started by hand (``python -m asyncflow.workers --role R
--config X.yaml overrides``) builds its settings with the same function, which is what keeps an
attached worker in agreement with the controller (model, engine, sampling, loss, data).

Every value comes from the config tree (:mod:`asyncflow.config`), where its default is written
once: these models declare no defaults of their own, except placement -- the cores a process is
pinned to, its torch threads, its data-parallel rank -- which belongs to whoever starts the
process, not to the run. Sections that a role takes whole are the config's own models
(``VLLMConfig``, ``EvalConfig``, the data section).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from asyncflow.config import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    VLLMConfig,
    describe_errors,
)

#: the roles a run can have, in start-up order
ROLES = ("rollout", "reward", "actor", "reference", "critic")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSettings(DataConfig):
    """The data section, plus the token limit every process applies to prompts alike."""

    #: ``model.max_model_len - rollout.max_new_tokens``: a longer prompt cannot fit the engine
    max_prompt_tokens: int = Field(ge=1)


class SamplingSettings(_Settings):
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int


class DistributedSettings(_Settings):
    """A data-parallel trainer rank's rendezvous (set by whoever starts the ranks)."""

    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    master_addr: str
    master_port: int = Field(ge=1, le=65535)


class _Placed(_Settings):
    #: CPU cores this process (and the threads it starts) is pinned to; None: not pinned
    cpus: list[int] | None = None


class RolloutSettings(_Placed):
    model: str
    seed: int
    engine: Literal["vllm", "transformers"]
    step_ordered: bool
    max_model_len: int
    vllm: VLLMConfig
    data: DataSettings
    eval: EvalConfig
    sampling: SamplingSettings


class RewardSettings(_Placed):
    model: str
    seed: int
    data: DataSettings
    function: str
    timeout_s: float
    on_failure: Literal["zero", "regenerate"]
    processes: int
    normalize_std: bool  #: GRPO advantages: divide by the group's reward std


class TrainerSettings(_Placed):
    """What the actor, reference and critic share."""

    model: str
    seed: int
    #: log-probs are scored at the rollout temperature (a greedy rollout, 0, scores at 1)
    temperature: float
    threads: int | None = None  #: torch threads (None: torch's default)
    distributed: DistributedSettings | None = None
    device: str | None = None  #: None: CUDA when available (per rank), else CPU


class ReferenceSettings(TrainerSettings):
    pass


class OptimizedSettings(TrainerSettings):
    """A trainer that takes optimizer steps (the actor, the critic)."""

    lr: float
    weight_decay: float
    max_grad_norm: float
    warmup_steps: int
    mixed_precision: Literal["fp32", "bf16"]
    shared_prefix: bool


class LossSettings(_Settings):
    """The policy loss (see :class:`asyncflow.algorithms.losses.PolicyLossConfig`)."""

    old_policy: Literal["current", "behaviour"]
    clip_low: float
    clip_high: float
    dual_clip: float | None
    importance_mode: Literal["none", "truncate", "mask"]
    importance_cap: float
    kl_coef: float
    kl_estimator: Literal["k1", "k2", "k3"]
    entropy_coef: float


class ActorSettings(OptimizedSettings):
    loss: LossSettings
    #: skip rows whose advantages are all zero (only where that is exact: see the config)
    skip_zero_advantage: bool


class CriticSettings(OptimizedSettings):
    value_clip: float
    gamma: float
    lam: float
    whiten_advantages: bool  #: resolved: ``algorithm.whiten_advantages`` or not streaming


RoleSettings = RolloutSettings | RewardSettings | ActorSettings | ReferenceSettings | CriticSettings

SETTINGS: dict[str, type[RoleSettings]] = {
    "rollout": RolloutSettings,
    "reward": RewardSettings,
    "actor": ActorSettings,
    "reference": ReferenceSettings,
    "critic": CriticSettings,
}


def role_settings(cfg: Config) -> dict[str, RoleSettings]:
    """The settings of every worker role, keyed by role name."""
    alg, rollout = cfg.algorithm, cfg.rollout
    common: dict[str, Any] = {"model": cfg.model.path, "seed": cfg.run.seed}
    data = DataSettings(
        **cfg.data.model_dump(),
        max_prompt_tokens=max(cfg.model.max_model_len - rollout.max_new_tokens, 1),
    )
    trainer = {**common, "temperature": rollout.temperature or 1.0}
    optimized = ("lr", "weight_decay", "max_grad_norm", "warmup_steps", "mixed_precision")
    loss = LossSettings(**alg.model_dump(include=set(LossSettings.model_fields)))

    def opt(section: Any) -> dict[str, Any]:
        return {**section.model_dump(include={*optimized, "shared_prefix", "threads"})}

    return {
        "rollout": RolloutSettings(
            **common,
            engine=rollout.engine,
            step_ordered=rollout.step_ordered,
            max_model_len=cfg.model.max_model_len,
            vllm=rollout.vllm,
            data=data,
            eval=cfg.eval,
            sampling=SamplingSettings(
                **rollout.model_dump(include=set(SamplingSettings.model_fields))
            ),
        ),
        "reward": RewardSettings(
            **common,
            data=data,
            function=cfg.reward.function,
            timeout_s=cfg.reward.timeout_s,
            on_failure=cfg.reward.on_failure,
            processes=cfg.reward.processes,
            normalize_std=alg.normalize_std,
        ),
        "actor": ActorSettings(
            **trainer,
            **opt(cfg.actor),
            loss=loss,
            skip_zero_advantage=alg.skip_zero_advantage,
        ),
        "reference": ReferenceSettings(**trainer, threads=cfg.reference.threads),
        "critic": CriticSettings(
            **trainer,
            **opt(cfg.critic),
            value_clip=cfg.critic.value_clip,
            gamma=alg.gamma,
            lam=alg.lam,
            whiten_advantages=(
                not alg.streaming if alg.whiten_advantages is None else alg.whiten_advantages
            ),
        ),
    }


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, recursively for nested objects."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_settings(
    role: str, given: Mapping[str, Any] | BaseModel | None = None, cfg: Config | None = None
) -> RoleSettings:
    """A role's typed settings: those of ``cfg`` (the default config when ``None``) with
    ``given`` (JSON from ``--settings``, possibly partial) merged over them, validated.

    A partial ``given`` is what a test or a hand-started worker passes (``{"threads": 1}``);
    what it leaves out is the config's, so every default still comes from the config tree."""
    if isinstance(given, BaseModel):
        if not isinstance(given, SETTINGS.get(role, ())):
            raise ConfigError(f"{type(given).__name__} are not the {role} role's settings")
        return cast(RoleSettings, given)
    if role not in SETTINGS:
        raise ConfigError(f"unknown role {role!r}; expected one of {list(SETTINGS)}")
    base = role_settings(cfg or Config())[role].model_dump(mode="json")
    tree = _merge(base, given or {})
    try:
        return SETTINGS[role].model_validate(tree)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, f"{role} settings")) from None


def settings_json(settings: RoleSettings) -> str:
    """The wire form of a role's settings (what ``--settings`` takes)."""
    return json.dumps(settings.model_dump(mode="json"))
