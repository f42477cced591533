"""The typed, validated config tree of a run (pydantic v2; imports no torch).

One tree for everything: a YAML preset from ``configs/`` plus dotted overrides from the command
line (``actor.lr=1e-5``). Every model forbids unknown keys, so a typo fails at start-up with the
full path of the key and what was expected, not halfway through a run.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = "tiny-grpo"
    output_dir: str = "runs"  #: the run directory is ``output_dir/name``
    seed: int = 0
    token: str | None = None  #: shared secret of the run's HTTP endpoints (default: random)
    host: str = "127.0.0.1"  #: the address spawned workers bind to
    progress: bool = True  #: show a progress bar (tqdm) on a terminal
    #: serve Prometheus /metrics on localhost at this port (0: a free one, written to
    #: RUN_DIR/metrics_url; null: off)
    metrics_port: int | None = Field(0, ge=0)
    #: pin spawned workers to CPU cores: rollout on the first half of the cores, trainers on
    #: the second half (on a 2-core machine their threads otherwise thrash each other)
    pin_cpus: bool = True
    #: with pin_cpus: "split" gives trainers only the second half; "overlap" lets trainers use
    #: every core (their threads then take up the cores rollout leaves idle)
    cpu_layout: Literal["split", "overlap"] = "split"


class ModelConfig(_Section):
    #: a transformers folder, or ``builtin:tiny-adder`` (the shipped tiny model)
    path: str = "builtin:tiny-adder"
    max_model_len: int = Field(128, ge=8)


class DataConfig(_Section):
    #: ``builtin:arithmetic`` (generated from the seed), or a ``.jsonl`` / ``.parquet`` file
    source: str = "builtin:arithmetic"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    train_size: int = Field(20_000, ge=1)  #: problems drawn for the built-in task
    on_bad_row: Literal["error", "skip"] = "skip"
    max_prompt_chars: int = Field(4096, ge=1)
    shuffle: bool = True


class EvalConfig(_Section):
    every: int = Field(50, ge=0)  #: evaluate every N steps (0: only at start and end)
    size: int = Field(256, ge=1)  #: held-out problems, greedy decoding
    source: str | None = None  #: a jsonl/parquet eval file (default: the built-in eval split)


class AlgorithmConfig(_Section):
    name: Literal["grpo", "ppo"] = "grpo"
    steps: int = Field(300, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    samples_per_prompt: int = Field(8, ge=1)  #: GRPO group size (1 is usual for PPO)
    #: bounded staleness: rollout for step s uses a policy of version >= s - k
    staleness: int = Field(1, ge=0)
    #: stream micro-batches to the trainer as they become ready (False: whole step at once)
    streaming: bool = True
    micro_batch_groups: int = Field(2, ge=1)  #: groups per streamed micro-batch
    normalize_std: bool = True  #: GRPO: divide by the group's reward std
    #: the PPO "old" policy of the clipped ratio. "current" (decoupled PPO): the trainer's own
    #: weights before the step -- with one optimizer step per batch the ratio is exactly 1, so
    #: clip_low/clip_high never bind and the trust region is the importance-weight cap
    #: (behaviour -> current, importance_mode/importance_cap). "behaviour": the rollout
    #: engine's log-probs -- the ratio current/behaviour is clipped (plain off-policy PPO)
    old_policy: Literal["current", "behaviour"] = "current"
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.28, ge=0)
    dual_clip: float | None = Field(None, gt=1)  #: for A < 0, cap the loss at -dual_clip * A
    importance_mode: Literal["none", "truncate", "mask"] = "truncate"
    importance_cap: float = Field(2.0, gt=0)
    kl_coef: float = Field(0.0, ge=0)  #: KL penalty to the reference (0: no reference worker)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    #: skip the forward/backward of rows whose advantages are all zero (e.g. a GRPO group whose
    #: samples got equal rewards) when the loss has no KL penalty or entropy bonus: they add
    #: exactly zero to the gradient, so the update is unchanged (the optimizer still steps)
    skip_zero_advantage: bool = True
    gamma: float = Field(1.0, ge=0, le=1)  #: PPO/GAE
    lam: float = Field(0.95, ge=0, le=1)  #: PPO/GAE
    #: PPO: whiten the GAE advantages (zero mean, unit variance) over each gae call's rows.
    #: None (default): only without streaming, where a call holds a whole step; a streaming
    #: call may hold a single row, whose own statistics would flip the sign of its first tokens
    whiten_advantages: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> AlgorithmConfig:
        if self.name == "grpo" and self.samples_per_prompt < 2:
            raise ValueError("GRPO needs samples_per_prompt >= 2 (it normalises within a group)")
        if self.micro_batch_groups > self.prompts_per_step:
            raise ValueError("micro_batch_groups must be <= prompts_per_step")
        return self


class VLLMConfig(_Section):
    dtype: str = "float32"
    cpu_kvcache_space_gib: int = Field(1, ge=1)
    cpu_threads_bind: str | None = None  #: e.g. "0-1" to use two cores on the CPU build
    gpu_memory_utilization: float = Field(0.25, gt=0, le=1)
    max_num_seqs: int = Field(256, ge=1)
    #: False: vLLM compiles the model with torch.compile (inductor; needs a C++ compiler on
    #: CPU): 10-20% less CPU per generated token on the tiny model, about 10 s more start-up
    #: (cached in ~/.cache/vllm after the first compile). True: plain eager PyTorch.
    enforce_eager: bool = False


class RolloutConfig(_Section):
    engine: Literal["vllm", "transformers"] = "vllm"
    workers: int = Field(1, ge=1)
    urls: list[str] = Field(default_factory=list)  #: attach to running workers instead
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_new_tokens: int = Field(32, ge=1)
    #: admit a step's prompts only once no older step is generating on that worker, so the
    #: step the trainer waits for finishes first (see workers/rollout.py: StepOrder)
    step_ordered: bool = True
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)


class RewardConfig(_Section):
    #: ``builtin:arithmetic``, ``builtin:math``, or ``module:function``
    function: str = "builtin:arithmetic"
    workers: int = Field(1, ge=1)
    urls: list[str] = Field(default_factory=list)
    timeout_s: float = Field(5.0, gt=0)
    on_failure: Literal["zero", "regenerate"] = "zero"
    #: child processes per reward worker that run a user reward function (isolated: a call
    #: that hangs past ``timeout_s`` or crashes costs its process, never the worker); the
    #: built-in verifiers run in the worker itself
    processes: int = Field(2, ge=1)


class TrainerConfig(_Section):
    lr: float = Field(3e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = 1.0
    warmup_steps: int = Field(0, ge=0)
    workers: int = Field(1, ge=1)  #: data-parallel ranks (torch.distributed, gloo/NCCL)
    urls: list[str] = Field(default_factory=list)
    threads: int | None = None  #: torch threads per trainer process (default: torch's)
    #: "bf16": forward/backward under bfloat16 autocast (float32 weights, optimizer and loss);
    #: about 2x faster on CPUs with AVX512-BF16/AMX and on GPUs; "fp32": float32 throughout
    mixed_precision: Literal["fp32", "bf16"] = "fp32"
    #: pack each GRPO group as one sequence (prompt once, then every response; block attention
    #: mask): forward/backward about 1.8x faster on short answers. Its explicit (S x S) mask
    #: rules out fused causal attention kernels: turn it off for very long groups on a GPU
    shared_prefix: bool = True


class ReferenceConfig(_Section):
    """The frozen reference model (used when ``algorithm.kl_coef > 0``): it is never trained,
    so it has no optimizer keys."""

    workers: int = Field(1, ge=1)
    urls: list[str] = Field(default_factory=list)
    threads: int | None = None  #: torch threads per reference process (default: torch's)


class CriticConfig(TrainerConfig):
    """The PPO critic: a trainer (the actor's keys, with its own defaults) plus its loss."""

    lr: float = Field(1e-4, gt=0)
    #: the value loss clips new values to within this distance of the values the critic
    #: predicted when the samples were scored (PPO's value clipping)
    value_clip: float = Field(0.2, gt=0)


class SyncConfig(_Section):
    bucket_mb: int = Field(128, ge=1)
    #: the torch.distributed backend of the weight sync. "auto": NCCL when the actor and every
    #: rollout engine report a CUDA device, gloo otherwise
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(120.0, gt=0)
    port: int = Field(0, ge=0)  #: rendezvous port of the sync group (0: pick a free one)


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0)  #: save every N steps (0: only at the end)
    at_end: bool = True  #: also save after the last step (benchmarks turn it off)
    keep: int = Field(2, ge=1)


class TimeoutConfig(_Section):
    """How long the controller waits for workers, and how often it tries again."""

    start_s: float = Field(600.0, gt=0)  #: for a worker to start (or come up at its URL)
    request_s: float = Field(600.0, gt=0)  #: for one request to a worker
    heartbeat_s: float = Field(2.0, gt=0)  #: between health probes of an attached worker
    #: failed tries in a row that one stage call, training step, weight sync or evaluation may
    #: make (one more fails the run); each is followed by a back-off growing to 2 s, time for
    #: the supervisor to replace a dead worker (the default gives a replacement about a minute)
    retries: int = Field(32, ge=0)


#: keys that were renamed: the old spelling fails naming the new one
RENAMED = {
    "workers": "timeouts",
}


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    actor: TrainerConfig = Field(default_factory=TrainerConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        micro = -(-self.algorithm.prompts_per_step // self.algorithm.micro_batch_groups)
        for name, tc in (("actor", self.actor), ("critic", self.critic)):
            if tc.workers > micro:
                raise ValueError(
                    f"{name}.workers={tc.workers} ranks need at least that many micro-batches per "
                    f"step; prompts_per_step / micro_batch_groups gives {micro}"
                )
        if self.algorithm.kl_coef == 0 and self.reference.urls:
            raise ValueError("reference.urls given but algorithm.kl_coef is 0 (no reference)")
        return self

    @property
    def rows_per_step(self) -> int:
        return self.algorithm.prompts_per_step * self.algorithm.samples_per_prompt

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def with_token(self) -> Config:
        if self.run.token:
            return self
        return self.model_copy(
            update={"run": self.run.model_copy(update={"token": secrets.token_hex(16)})}
        )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ConfigError(ValueError):
    """A config file or override that does not fit the tree; the message names the key."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML: numbers, bools, lists...)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    return path, value


def _set(tree: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        node = nxt
    node[path[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (plain YAML keeps
    the last one silently: ``actor: {lr: 0.1}`` then ``actor: {lr: 0.2}`` drops the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key {key!r} is given twice",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)  # type: ignore[no-untyped-call,no-any-return]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build the config from an optional YAML preset and dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            # a SafeLoader subclass: as safe as yaml.safe_load
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top")
        tree = loaded or {}
    for item in overrides:
        keys, value = parse_override(item)
        raw = item.split("=", 1)[1].strip()
        if _is_text_field(keys) and value is not None and not raw.startswith(("'", '"')):
            # a text key takes the text as written: YAML would read run.name=2024-06-01 as a
            # date and run.name=7 as a number, and cut "exp #1" at its comment marker
            # (quoted YAML strings and null still mean what YAML says)
            value = raw
        _set(tree, keys, value, item)
    return from_tree(tree)


def _is_text_field(keys: Sequence[str]) -> bool:
    """Whether ``keys`` names a field typed ``str`` (or ``str | None``) in :class:`Config`."""
    model: Any = Config
    ann: Any = None
    for part in keys:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = model = field.annotation
    return ann is str or ann == (str | None)


def from_tree(tree: Mapping[str, Any]) -> Config:
    for old, new in RENAMED.items():
        if old in tree:
            raise ConfigError(
                f"invalid config:\n  {old}: this section is now called {new!r} "
                f"(write {new}.KEY, e.g. {new}.start_s=60)"
            )
    try:
        return Config.model_validate(dict(tree))
    except ValidationError as e:
        raise ConfigError(describe(e)) from None


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed next to the unknown one at ``loc``."""
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def describe(e: ValidationError) -> str:
    """A config validation error: each problem on a line naming its dotted key (an unknown key
    with the keys allowed beside it)."""
    return describe_errors(e, "config", known=_known_keys)


def describe_errors(
    e: ValidationError,
    title: str,
    known: Callable[[tuple[Any, ...]], list[str]] | None = None,
) -> str:
    """A validation error of any model, one line per problem, each naming its dotted key;
    ``known`` lists the keys allowed next to an unknown one."""
    lines = [f"invalid {title}:"]
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top)"
        if err["type"] == "extra_forbidden":
            expected = f"; expected one of {known(err['loc'])}" if known else ""
            lines.append(f"  {key}: unknown key{expected}")
        else:
            got = json.dumps(err.get("input"), default=str)[:80]
            lines.append(f"  {key}: {err['msg']} (got {got})")
    return "\n".join(lines)
