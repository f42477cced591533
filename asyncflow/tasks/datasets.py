"""Prompt datasets: the rows the controller admits, from the built-in task or from user files.

This module owns turning a source of prompts (the built-in arithmetic task, a JSON-lines file,
a parquet file) into a ``PromptSource``: an indexable list of ``PromptRow(prompt, answer,
index)``. It validates every row and reports bad ones by file, line (1-based; for parquet the
1-based row number) and problem. With ``on_bad_row="skip"`` bad rows are left out and recorded
in ``PromptSource.skipped``. It imports no torch: token limits take a ``count_tokens`` callable.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from asyncflow.tasks.arithmetic import eval_problems, train_problems

BadRowPolicy = Literal["error", "skip"]


@dataclass(frozen=True, slots=True)
class PromptRow:
    """One prompt with its reference answer; ``index`` is its position in the source."""

    prompt: str
    answer: str
    index: int


class DatasetError(ValueError):
    """A bad row (or a bad file) in a prompt dataset, naming where and what."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.reason = path, line, reason


class PromptSource(Sequence[PromptRow]):
    """An immutable, indexable list of prompt rows with the name of where they came from."""

    def __init__(
        self, rows: Iterable[PromptRow], name: str, skipped: Sequence[tuple[int, str]] = ()
    ) -> None:
        self.rows: tuple[PromptRow, ...] = tuple(rows)
        self.name = name
        self.skipped: list[tuple[int, str]] = list(skipped)  # (line, reason) of each bad row
        if not self.rows:
            detail = f" (all {len(self.skipped)} rows were bad)" if self.skipped else ""
            raise ValueError(f"{name}: the dataset is empty{detail}")

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> PromptRow: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[PromptRow]: ...
    def __getitem__(self, i: int | slice) -> PromptRow | Sequence[PromptRow]:
        return self.rows[i]

    def __iter__(self) -> Iterator[PromptRow]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"PromptSource({self.name!r}, rows={len(self)}, skipped={len(self.skipped)})"


def load_builtin(
    split: Literal["train", "eval"] = "train", size: int = 1024, seed: int = 0
) -> PromptSource:
    """Prompts of the built-in arithmetic task (``answer`` is the final sum, e.g. ``"1023"``)."""
    if split == "train":
        problems = train_problems(size, seed)
    elif split == "eval":
        problems = eval_problems(size, seed)
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rows = (PromptRow(p.prompt, p.answer, i) for i, p in enumerate(problems))
    return PromptSource(rows, name=f"builtin:arithmetic/{split}(size={size}, seed={seed})")


@dataclass(frozen=True, slots=True)
class RowRules:
    """How raw records become rows: field names and limits on the prompt."""

    prompt_field: str = "prompt"
    answer_field: str = "answer"
    max_prompt_chars: int | None = None
    max_prompt_tokens: int | None = None
    count_tokens: Callable[[str], int] | None = None

    def __post_init__(self) -> None:
        if self.max_prompt_tokens is not None and self.count_tokens is None:
            raise ValueError("max_prompt_tokens needs count_tokens (a str -> int callable)")


def _text_field(record: dict[str, Any], field: str, allow_numbers: bool) -> str:
    """The field as text; raises ``ValueError`` with the problem otherwise."""
    if field not in record:
        raise ValueError(f"missing field {field!r}")
    value = record[field]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"field {field!r} is not valid UTF-8 ({exc.reason})") from None
    if allow_numbers and isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"field {field!r} is not a finite number ({value})")
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800": a lone surrogate, not text
        raise ValueError(
            f"field {field!r} is not text (a lone surrogate at character {exc.start})"
        ) from None
    return value


def _check_record(record: object, rules: RowRules) -> tuple[str, str]:
    """``(prompt, answer)`` of a valid record; raises ``ValueError(reason)`` otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    prompt = _text_field(record, rules.prompt_field, allow_numbers=False)
    answer = _text_field(record, rules.answer_field, allow_numbers=True)
    if not prompt.strip():
        raise ValueError(f"empty prompt in field {rules.prompt_field!r}")
    if rules.max_prompt_chars is not None and len(prompt) > rules.max_prompt_chars:
        raise ValueError(
            f"prompt too long: {len(prompt)} characters > max_prompt_chars={rules.max_prompt_chars}"
        )
    if rules.max_prompt_tokens is not None and rules.count_tokens is not None:
        n = rules.count_tokens(prompt)
        if n > rules.max_prompt_tokens:
            raise ValueError(
                f"prompt too long: {n} tokens > max_prompt_tokens={rules.max_prompt_tokens}"
            )
    return prompt, answer


def _collect(
    records: Iterable[tuple[int, object]], path: str, rules: RowRules, on_bad_row: BadRowPolicy
) -> PromptSource:
    """Validate ``(line, record)`` pairs into a source; a record that is an exception is bad."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    rows: list[PromptRow] = []
    skipped: list[tuple[int, str]] = []
    for line, record in records:
        try:
            if isinstance(record, Exception):
                raise record
            prompt, answer = _check_record(record, rules)
        except ValueError as exc:
            if on_bad_row == "error":
                raise DatasetError(path, line, str(exc)) from None
            skipped.append((line, str(exc)))
            continue
        rows.append(PromptRow(prompt, answer, len(rows)))
    return PromptSource(rows, name=path, skipped=skipped)


def _jsonl_records(raw: bytes) -> Iterator[tuple[int, object]]:
    """``(line, parsed object or ValueError)`` for every non-blank line."""
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        if not chunk.strip():
            continue
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, ValueError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})")


def load_jsonl(
    path: str | os.PathLike[str], on_bad_row: BadRowPolicy = "error", **rules: Any
) -> PromptSource:
    """Prompts from a JSON-lines file, one object per line; ``rules`` are ``RowRules`` fields."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(name, None, f"cannot read the file ({exc.strerror})") from None
    if not raw.strip():
        raise DatasetError(name, None, "the dataset is empty (no rows)")
    return _collect(_jsonl_records(raw), name, RowRules(**rules), on_bad_row)


def load_parquet(
    path: str | os.PathLike[str], on_bad_row: BadRowPolicy = "error", **rules: Any
) -> PromptSource:
    """Prompts from a parquet file (needs ``pyarrow``); lines in errors are 1-based rows."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path}: reading parquet files needs pyarrow; install it with `pip install pyarrow`"
        ) from None
    name = str(path)
    row_rules = RowRules(**rules)
    try:
        table = pq.read_table(name)
    except (OSError, ValueError) as exc:
        raise DatasetError(name, None, f"cannot read the parquet file ({exc})") from None
    if table.num_rows == 0:
        raise DatasetError(name, None, "the dataset is empty (no rows)")
    for field in (row_rules.prompt_field, row_rules.answer_field):
        if field not in table.column_names:
            raise DatasetError(name, None, f"missing column {field!r} (has {table.column_names})")
    records = table.select([row_rules.prompt_field, row_rules.answer_field]).to_pylist()
    return _collect(enumerate(records, start=1), name, row_rules, on_bad_row)


def load_prompts(
    path: str | os.PathLike[str], on_bad_row: BadRowPolicy = "error", **rules: Any
) -> PromptSource:
    """Prompts from a ``.jsonl``/``.json`` (JSON lines) or ``.parquet`` file, by extension."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return load_jsonl(path, on_bad_row, **rules)
    if suffix in (".parquet", ".pq"):
        return load_parquet(path, on_bad_row, **rules)
    raise ValueError(f"{path}: unknown dataset format {suffix!r}; expected .jsonl or .parquet")


__all__ = [
    "BadRowPolicy",
    "DatasetError",
    "PromptRow",
    "PromptSource",
    "RowRules",
    "load_builtin",
    "load_jsonl",
    "load_parquet",
    "load_prompts",
]
