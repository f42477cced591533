"""Where a run's model and prompts come from, resolved the same way in every process.

Workers load prompts themselves (the controller hands out only dataset indices), so the
controller, the rollout workers and the reward workers must agree on the dataset: they all call
:func:`train_source` / :func:`eval_source` with the same settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asyncflow.config import DataConfig, EvalConfig
from asyncflow.tasks.datasets import PromptRow, PromptSource, load_builtin, load_prompts

BUILTIN_MODELS = ("builtin:tiny-adder",)
BUILTIN_REWARDS = {
    "builtin:arithmetic": "asyncflow.rewards.math:arithmetic_reward",
    "builtin:math": "asyncflow.rewards.math:math_reward",
}


def resolve_model(path: str) -> Path:
    """A transformers folder for ``path`` (``builtin:tiny-adder`` is the shipped tiny model)."""
    if path == "builtin:tiny-adder":
        from asyncflow.tasks.tiny_model import ensure_tiny_model

        return ensure_tiny_model()
    if path.startswith("builtin:"):
        raise ValueError(f"unknown built-in model {path!r}; known: {BUILTIN_MODELS}")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"model path {path!r} is not a transformers folder (no config.json)")
    return p


def reward_spec(function: str) -> tuple[str, bool]:
    """(``module:function``, trusted) for a configured reward; built-ins run in-process."""
    if function in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[function], True
    if function.startswith("builtin:"):
        raise ValueError(f"unknown built-in reward {function!r}; known: {list(BUILTIN_REWARDS)}")
    return function, False


def _sections(
    data: DataConfig | Mapping[str, Any], eval_cfg: EvalConfig | Mapping[str, Any] | None = None
) -> tuple[DataConfig, EvalConfig, int | None]:
    """The data and eval sections as the config's models (a plain mapping, as a library user or a
    test may pass, gets the config tree's defaults), and the prompt token limit if any."""
    if isinstance(data, Mapping):
        rest = dict(data)
        limit = rest.pop("max_prompt_tokens", None)
        data = DataConfig.model_validate(rest)
    else:
        limit = getattr(data, "max_prompt_tokens", None)
    if not isinstance(eval_cfg, EvalConfig):
        eval_cfg = EvalConfig.model_validate(dict(eval_cfg or {}))
    return data, eval_cfg, limit


def train_source(
    data: DataConfig | Mapping[str, Any], seed: int, model_dir: str | None = None
) -> PromptSource:
    """The training prompts named by a ``data`` config section.

    With ``max_prompt_tokens`` and the model folder, prompts longer than that many tokens (they
    would not fit the engine's ``max_model_len`` with the response) are bad rows: skipped and
    counted, or an error, per ``on_bad_row`` -- the same in every process. The limit is the
    section's ``max_prompt_tokens`` (:class:`~asyncflow.roles.settings.DataSettings` has one)."""
    data, _, limit = _sections(data)
    if data.source == "builtin:arithmetic":
        return load_builtin("train", data.train_size, seed)
    return _load_file(data.source, data, model_dir, limit)


def eval_source(
    data: DataConfig | Mapping[str, Any],
    eval_cfg: EvalConfig | Mapping[str, Any],
    seed: int,
    model_dir: str | None = None,
) -> PromptSource:
    """Held-out prompts: the first ``eval.size`` rows of an eval file (all, if it has fewer),
    or ``eval.size`` problems of the built-in task's disjoint eval split.

    An eval file's rows get the training rows' rules (:func:`train_source`: the ``data``
    section's fields, character limit, ``on_bad_row``, and with the model folder its token
    limit): a bad row is skipped and recorded in ``skipped``, or an error."""
    data, eval_cfg, limit = _sections(data, eval_cfg)
    size = eval_cfg.size
    if eval_cfg.source:
        source = _load_file(eval_cfg.source, data, model_dir, limit)
        if len(source) <= size:
            return source
        return PromptSource(source.rows[:size], source.name, source.skipped)
    if data.source != "builtin:arithmetic":
        raise ValueError("eval.source is required when data.source is not the built-in task")
    return load_builtin("eval", size, seed)


def _load_file(
    path: str, data: DataConfig, model_dir: str | None, limit: int | None
) -> PromptSource:
    """A prompt file, its rows checked by the ``data`` section's rules."""
    count = None
    if limit and model_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        count = lambda text: len(tok.encode(text))  # noqa: E731
    return load_prompts(
        path,
        data.on_bad_row,
        prompt_field=data.prompt_field,
        answer_field=data.answer_field,
        max_prompt_chars=data.max_prompt_chars,
        max_prompt_tokens=limit if count and limit else None,
        count_tokens=count,
    )


def prompt_row(source: PromptSource, meta: dict[str, Any]) -> PromptRow:
    """The dataset row a sample's metadata names; a bad index is the caller's mistake."""
    index = meta.get("index")
    if type(index) is not int or not 0 <= index < len(source):
        raise LookupError(
            f"row metadata names dataset index {index!r}; the dataset "
            f"{source.name} has {len(source)} rows"
        )
    return source[index]
