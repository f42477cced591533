"""Checking a work request's ``params`` and batch before an op acts on them.

A malformed request is the client's mistake: the op refuses it with a :class:`BadRequest` (a
JSON 4xx, counted by kind) whose message names the parameter, before it changes any state --
never a 500 from deep inside the op (``int("abc")``, ``params["path"]``, ``min([])``).

An optional parameter given as ``null`` counts as absent (its default applies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from asyncflow.transfer.index import BatchMeta
from asyncflow.transfer.service import BadRequest

REQUIRED: Any = object()  #: the default of a parameter that must be given
SYNC_BACKENDS = ("gloo", "nccl")  #: what ``sync_init`` accepts (see engines/weight_sync.py)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _value(params: Mapping[str, Any], name: str, default: Any, what: str) -> tuple[Any, bool]:
    """``(value, given)``: the parameter, or its default (``given`` false: nothing to check)."""
    value = params.get(name)
    if value is not None:
        return value, True
    if default is REQUIRED:
        if name in params:
            raise BadRequest(f"params.{name} must be {what}, got None")
        raise BadRequest(f"params.{name} is required ({what})")
    return default, False


def int_param(
    params: Mapping[str, Any],
    name: str,
    default: Any = REQUIRED,
    *,
    low: int | None = 0,
    high: int | None = None,
) -> int:
    """An integer in ``[low, high]`` (either bound may be open); ``bool`` is not one."""
    if low is not None and high is not None:
        what = f"an integer in [{low}, {high}]"
    elif low is not None:
        what = f"an integer >= {low}"
    else:
        what = "an integer" if high is None else f"an integer <= {high}"
    value, given = _value(params, name, default, what)
    ok = type(value) is int
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if given and not ok:
        raise BadRequest(f"params.{name} must be {what}, got {_shown(value)}")
    return int(value)


def number_param(
    params: Mapping[str, Any],
    name: str,
    default: Any = REQUIRED,
    *,
    low: float | None = None,
    positive: bool = False,
    high: float | None = None,
) -> float:
    """A finite number (``> 0`` with ``positive``, else ``>= low``; ``<= high``)."""
    what = "a finite number"
    if positive:
        what += " > 0"
    elif low is not None:
        what += f" >= {low:g}"
    if high is not None:
        what += f" and <= {high:g}"
    value, given = _value(params, name, default, what)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if positive else low is None or value >= low) and (
            high is None or value <= high
        )
    if given and not ok:
        raise BadRequest(f"params.{name} must be {what}, got {_shown(value)}")
    return float(value)


def str_param(
    params: Mapping[str, Any],
    name: str,
    default: Any = REQUIRED,
    *,
    choices: Sequence[str] | None = None,
) -> str:
    """A non-empty string (one of ``choices`` when given)."""
    what = "a non-empty string" if choices is None else f"one of {list(choices)}"
    value, given = _value(params, name, default, what)
    ok = isinstance(value, str) and bool(value) and (choices is None or value in choices)
    if given and not ok:
        raise BadRequest(f"params.{name} must be {what}, got {_shown(value)}")
    return str(value)


def str_list_param(params: Mapping[str, Any], name: str, default: Any = REQUIRED) -> list[str]:
    """A list of non-empty strings."""
    what = "a list of non-empty strings"
    value, given = _value(params, name, default, what)
    if given and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        raise BadRequest(f"params.{name} must be {what}, got {_shown(value)}")
    return list(value)


def object_param(params: Mapping[str, Any], name: str, default: Any = REQUIRED) -> dict[str, Any]:
    """A JSON object."""
    value, given = _value(params, name, default, "an object")
    if given and not isinstance(value, dict):
        raise BadRequest(f"params.{name} must be an object, got {_shown(value)}")
    return dict(value)


def need_batch(batch: BatchMeta | None, op: str, columns: Sequence[str] = ()) -> BatchMeta:
    """The request's batch: present, with at least one row and the ``columns`` the op reads."""
    if batch is None:
        raise BadRequest(f"{op} needs a batch")
    if not batch.rows:
        raise BadRequest(f"{op} needs a batch of at least one row, got an empty batch")
    missing = [c for c in columns if c not in batch.fields]
    if missing:
        raise BadRequest(
            f"{op}: the batch has no column {missing[0]!r} (it needs {list(columns)}; "
            f"it has {sorted(batch.fields)})"
        )
    return batch
