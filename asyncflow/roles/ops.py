"""The request and the answer of every worker op, typed: the controller and the workers import
the same models (pydantic v2; no torch here).

A worker serves ``POST /v1/work/{op}`` with a JSON body ``{"batch": BatchMeta | null, "units":
{...}, "params": {...}}``. :data:`OPS` names, for each role, its ops and for each op the model
of its ``params`` and the model of its answer (:class:`OpSpec`).

Params are checked before the op acts on them (:func:`check`): a malformed request is the
client's mistake, refused with one message naming the parameter -- ``params.step must be an
integer >= 0, got 'abc'``, ``params.path is required (a non-empty string)`` -- whatever the
op. The message is made from the field's type and constraints (:func:`describe`), never
written per op. The rules every params model follows (:class:`Params`):

- strict types: a bool is not an integer, ``"2"`` is not one, ``1.5`` is not one; a number is
  finite (NaN and infinities are refused);
- an optional parameter given as ``null`` counts as absent: its default applies;
- unknown parameters are ignored.

Answers are built by the worker and validated by whoever parses them
(``FinishResult.model_validate(out)``): a worker answers what it did -- an optimizer step taken
is not undone because a metric came out oddly typed -- so it builds its answer unvalidated
(``model_construct``, typed by the pydantic mypy plugin) and sends :func:`wire` of it.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types as at
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

MAX_IDS = 1_000_000  #: ids per list (as asyncflow.transfer.service.MAX_IDS)
MAX_ID = (1 << 63) - 1  #: ids travel as int64 (as asyncflow.transfer.service.MAX_ID)

SyncBackend = Literal["gloo", "nccl"]
SYNC_BACKENDS: tuple[str, ...] = get_args(SyncBackend)  #: see engines/weight_sync.py

#: the error type of a validator that words the rest of the message itself (:func:`said`)
SAID = "asyncflow_said"

P = TypeVar("P", bound="Params")


class InvalidParams(ValueError):
    """Params that break their model; the message names the parameter (a worker answers 400)."""


# ---------------------------------------------------------------------------------- params
class Params(BaseModel):
    """The base of every op's params (see the module's docstring for the rules)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or (k in fields and fields[k].is_required())
        }

    @classmethod
    def _what(cls, name: str, given: Mapping[str, Any]) -> str | None:
        """What parameter ``name`` must be, where it depends on the other ``given`` params
        (``None``: what its type and constraints say)."""
        return None


class NoParams(Params):
    """An op that takes no params (any given are ignored)."""


def said(tail: str) -> PydanticCustomError:
    """An error whose message is the parameter's name followed by ``tail``."""
    return PydanticCustomError(SAID, "{tail}", {"tail": tail})


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _eval_indices(value: Any) -> list[int] | None:
    """Dataset indices of the eval set: a non-empty list of ids in ``[0, 2**63)``."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise said(" must be a list of integers")
    if len(value) > MAX_IDS:
        raise said(f": at most {MAX_IDS} ids per request, got {len(value)}")
    for v in value:
        if not (type(v) is int and 0 <= v <= MAX_ID):
            raise said(f" must be integers in [0, 2**63), got {_shown(v)}")
    if not value:
        raise said(" must name at least one eval row, got []")
    return value


NonEmptyStr = Annotated[str, Field(min_length=1)]
EvalIndices = Annotated[
    list[int] | None, PlainValidator(_eval_indices, json_schema_input_type=list[int] | None)
]


class SamplingOverrides(Params):
    """A request's changes to the worker's sampling settings (absent: the worker's)."""

    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: int | None = None


class Sampling(Params):
    """The sampling a request gets: the worker's settings with the request's overrides."""

    max_new_tokens: Annotated[int, Field(ge=1)] = 32
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: int = -1


class GenerateParams(Params):
    """rollout ``generate``: a row's seed is ``seed`` + its row id (no seed: unseeded)."""

    seed: int | None = None
    sampling: SamplingOverrides = Field(default_factory=SamplingOverrides)


class EvaluateParams(Params):
    """rollout ``evaluate``: greedy (unless ``sampling`` says otherwise) on eval rows
    ``indices`` (none: all), scored by ``reward``."""

    indices: EvalIndices = None
    sampling: SamplingOverrides = Field(default_factory=SamplingOverrides)
    reward: NonEmptyStr = "builtin:arithmetic"
    timeout_s: Annotated[float, Field(gt=0)] = 5.0


class RolloutSyncInitParams(Params):
    """rollout ``sync_init``: join the weight-sync group as ``rank`` (the trainer is rank 0).

    Fields are declared in the order they are checked: ``rank``'s bound needs ``world_size``."""

    world_size: Annotated[int, Field(ge=2)]
    host: NonEmptyStr
    port: Annotated[int, Field(ge=1, le=65535)]
    rank: Annotated[int, Field(ge=1)]
    backend: SyncBackend = "gloo"
    timeout_s: Annotated[float, Field(gt=0)] = 120.0

    @field_validator("rank")
    @classmethod
    def _rank_in_group(cls, rank: int, info: ValidationInfo) -> int:
        world_size = info.data.get("world_size")
        if world_size is not None and rank > world_size - 1:
            raise ValueError("rank out of the group")
        return rank

    @classmethod
    def _what(cls, name: str, given: Mapping[str, Any]) -> str | None:
        world_size = given.get("world_size")
        if name == "rank" and type(world_size) is int:
            return f"an integer in [1, {world_size - 1}]"
        return None


class ActorSyncInitParams(Params):
    """actor ``sync_init``: host the weight-sync group as its rank 0."""

    host: NonEmptyStr
    port: Annotated[int, Field(ge=1, le=65535)]
    world_size: Annotated[int, Field(ge=1)]
    backend: SyncBackend = "gloo"
    bucket_mb: Annotated[int, Field(ge=1)] = 128
    timeout_s: Annotated[float, Field(gt=0)] = 120.0


class StepParams(Params):
    """actor/critic ``finish``: the training step (and attempt at it) and the sizes that
    normalise its loss over every rank."""

    step: Annotated[int, Field(ge=0)]
    attempt: Annotated[int, Field(ge=0)] = 0
    global_tokens: Annotated[float, Field(gt=0)]
    global_sequences: Annotated[int, Field(ge=1)]

    @property
    def key(self) -> tuple[int, int]:
        return self.step, self.attempt


class TrainMicroParams(StepParams):
    """actor/critic ``train_micro``: a step's micro-batch, with the extra ``columns`` it reads."""

    columns: list[NonEmptyStr] = Field(default_factory=list)


class PathParams(Params):
    """actor/critic ``save`` and ``load``: the checkpoint folder."""

    path: NonEmptyStr


# ------------------------------------------------------------------------- param messages
def check(model: type[P], raw: Mapping[str, Any], prefix: str = "params") -> P:
    """``raw`` as a ``model``, or :class:`InvalidParams` naming the first bad parameter
    (``prefix``: how the client calls ``raw``, e.g. ``params.sampling``)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise InvalidParams(error_message(model, e, raw, prefix)) from None


def error_message(
    model: type[BaseModel], error: ValidationError, raw: Any, prefix: str = "params"
) -> str:
    """The first problem of ``error`` (from validating ``raw`` as ``model``) in words:
    ``PREFIX.NAME is required (WHAT)`` or ``PREFIX.NAME must be WHAT, got VALUE``."""
    err = error.errors(include_url=False)[0]
    owner: type[BaseModel] | None = model
    parent, given, value = model, raw, raw
    names: list[str] = []
    field: FieldInfo | None = None
    for part in err["loc"]:  # down through nested models; a list index stays with its list
        if owner is None or not isinstance(part, str) or part not in owner.model_fields:
            break
        parent, given, field = owner, value, owner.model_fields[part]
        names.append(part)
        value = value.get(part) if isinstance(value, Mapping) else None
        owner = _model_of(field.annotation)
    name = ".".join([prefix, *names])
    if err["type"] == SAID:
        return name + str((err.get("ctx") or {}).get("tail", ""))
    if field is None:  # the whole thing
        if err["type"] in ("model_type", "dict_type"):
            return f"{prefix} must be an object, got {_shown(raw)}"
        return f"{prefix}: {err['msg']}"
    what = None
    if issubclass(parent, Params) and isinstance(given, Mapping):
        what = parent._what(names[-1], given)
    what = what or describe(field.annotation, field.metadata)
    if err["type"] == "missing":
        return f"{name} is required ({what})"
    return f"{name} must be {what}, got {_shown(value)}"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    ann, _ = _unwrap(annotation, [])
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _unwrap(annotation: Any, metadata: Sequence[Any]) -> tuple[Any, list[Any]]:
    """The type under ``Annotated[...]`` and ``X | None``, and every constraint met on the way."""
    meta = list(metadata)
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = get_args(annotation)
            for m in extra:
                meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
        elif origin in (Union, types.UnionType):
            kept = [a for a in get_args(annotation) if a is not type(None)]
            if len(kept) != 1:
                return annotation, meta
            annotation = kept[0]
        else:
            return annotation, meta


def _bounds(meta: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in meta:
        for key in ("ge", "gt", "le", "lt", "min_length"):
            if isinstance(m, at.BaseMetadata) and getattr(m, key, None) is not None:
                out[key] = getattr(m, key)
    return out


def describe(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """What a value of a params field must be, in words: ``an integer in [1, 65535]``, ``a
    finite number > 0``, ``one of ['gloo', 'nccl']``, ``a list of non-empty strings``..."""
    ann, meta = _unwrap(annotation, metadata)
    b = _bounds(meta)
    origin = get_origin(ann)
    if origin is Literal:
        return f"one of {list(get_args(ann))}"
    if origin is list or ann is list:
        args = get_args(ann)
        return "a list of " + _plural(describe(args[0]) if args else "a value")
    if origin is dict or ann is dict or (isinstance(ann, type) and issubclass(ann, BaseModel)):
        return "an object"
    if ann is bool:
        return "true or false"
    if ann is int:
        low = b.get("ge", None if "gt" not in b else b["gt"] + 1)
        high = b.get("le", None if "lt" not in b else b["lt"] - 1)
        if low is not None and high is not None:
            return f"an integer in [{low}, {high}]"
        if low is not None:
            return f"an integer >= {low}"
        return "an integer" if high is None else f"an integer <= {high}"
    if ann is float:
        what = "a finite number"
        if "gt" in b:
            what += f" > {b['gt']:g}"
        elif "ge" in b:
            what += f" >= {b['ge']:g}"
        if "le" in b:
            what += f" and <= {b['le']:g}"
        elif "lt" in b:
            what += f" and < {b['lt']:g}"
        return what
    if ann is str:
        return "a non-empty string" if b.get("min_length", 0) >= 1 else "a string"
    return f"a {getattr(ann, '__name__', ann)}"


def _plural(what: str) -> str:
    """``a non-empty string`` -> ``non-empty strings``, ``an integer >= 0`` -> ``integers >= 0``."""
    words = what.split(" ")
    if words[0] in ("a", "an"):
        words = words[1:]
    for i, w in enumerate(words):
        if w in ("string", "integer", "number", "object", "value", "list"):
            words[i] = w + "s"
            break
    return " ".join(words)


# --------------------------------------------------------------------------------- answers
class Result(BaseModel):
    """The base of every op's answer (unknown keys are ignored when parsing one)."""

    model_config = ConfigDict(extra="ignore")


class Produced(Result):
    """Metadata of a column a role just stored in its unit, as the controller's index wants it."""

    shapes: list[list[int]]
    dtype: str
    version: int = -1

    @classmethod
    def of(cls, shapes: Iterable[Iterable[int]], dtype: str, version: int = -1) -> Produced:
        """What a unit's ``put`` stored (its row shapes, e.g. ``torch.Size``s)."""
        return cls.model_construct(shapes=[list(s) for s in shapes], dtype=dtype, version=version)


class WorkResult(Result):
    """An op that stored columns in its unit: ``ref_logprobs``, ``values``, ``gae``,
    ``advantages``."""

    produced: dict[str, Produced]


class GenerateMetrics(Result):
    versions: list[int]  #: the policy version that generated each row
    response_lengths: list[int]
    finish: list[str]  #: "stop" | "length" | "abort"


class GenerateResult(WorkResult):
    metrics: GenerateMetrics


class ScoreMetrics(Result):
    rewards: list[float]
    failed: list[tuple[int, str]]  #: (row id, error) of each call that raised or timed out
    n_failed: int


class ScoreResult(WorkResult):
    """``score`` (produces ``reward``) and ``score_groups`` (``reward`` and ``advantages``)."""

    metrics: ScoreMetrics


class EvaluateMetrics(Result):
    accuracy: float
    mean_reward: float
    n: int
    skipped_rows: int  #: bad rows left out of the eval set
    version: int
    mean_length: float
    examples: list[tuple[str, str]]  #: (prompt, response) of the first few rows


class EvaluateResult(Result):
    metrics: EvaluateMetrics


class OkResult(Result):
    """``sync_init``."""

    ok: bool = True


class CheckpointResult(OkResult):
    """``save`` and ``load``: the policy version of the weights saved or loaded."""

    version: int


class TrainMicroResult(Result):
    metrics: dict[str, float]


class FinishResult(Result):
    """``finish``: the step's metrics (reduced over the ranks); ``version``: the new policy
    version (the optimizer steps taken)."""

    metrics: dict[str, float]
    version: int


class SyncSendMetrics(Result):
    seconds: float
    bytes: int


class SyncSendResult(Result):
    version: int
    metrics: SyncSendMetrics


class SyncRecvMetrics(Result):
    version: int
    recv_s: float
    total_s: float
    reload: str  #: how the engine took the weights in


class SyncRecvResult(Result):
    metrics: SyncRecvMetrics


def wire(result: BaseModel) -> dict[str, Any]:
    """An answer as the JSON a worker sends (not validated again: see the module's docstring)."""
    out: dict[str, Any] = result.model_dump(mode="json", warnings=False)
    return out


# ----------------------------------------------------------------------------------- table
@dataclass(frozen=True, slots=True)
class OpSpec:
    """An op's params model and answer model."""

    params: type[Params]
    result: type[Result]


_TRAINER = {
    "train_micro": OpSpec(TrainMicroParams, TrainMicroResult),
    "finish": OpSpec(StepParams, FinishResult),
    "save": OpSpec(PathParams, CheckpointResult),
    "load": OpSpec(PathParams, CheckpointResult),
}

#: role -> op -> its params and answer
OPS: dict[str, dict[str, OpSpec]] = {
    "rollout": {
        "generate": OpSpec(GenerateParams, GenerateResult),
        "evaluate": OpSpec(EvaluateParams, EvaluateResult),
        "sync_init": OpSpec(RolloutSyncInitParams, OkResult),
        "sync_recv": OpSpec(NoParams, SyncRecvResult),
    },
    "reward": {
        "score": OpSpec(NoParams, ScoreResult),
        "advantages": OpSpec(NoParams, WorkResult),
        "score_groups": OpSpec(NoParams, ScoreResult),
    },
    "actor": {
        **_TRAINER,
        "sync_init": OpSpec(ActorSyncInitParams, OkResult),
        "sync_send": OpSpec(NoParams, SyncSendResult),
    },
    "reference": {"ref_logprobs": OpSpec(NoParams, WorkResult)},
    "critic": {
        "values": OpSpec(NoParams, WorkResult),
        "gae": OpSpec(NoParams, WorkResult),
        **_TRAINER,
    },
    "storage": {},
}
