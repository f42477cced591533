"""Which checkpoint a replaced trainer loads.

While step s's weight sync runs in the background, the actor is already at version s + 1 (its
step is committed and checkpointed) but the rollout engines still serve s. A trainer replaced
in that window must load step s + 1's checkpoint: loading s would lose step s's update and make
the pending sync report the wrong version (the chaos test once failed exactly so).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from asyncflow.controller.supervisor import Supervisor


async def _noop(*_: Any) -> Any:
    raise AssertionError("not called")


def _checkpoint(root: Path, version: int) -> None:
    path = root / f"step_{version:06d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")


async def test_replaced_trainer_loads_last_committed_version(tmp_path: Path) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    async def call(worker: Any, op: str, params: dict[str, Any]) -> dict[str, Any]:
        calls.append((op, params))
        return {}

    for v in (3, 4):
        _checkpoint(tmp_path, v)
    pipeline = SimpleNamespace(version=3, trained_version=4, call=call)
    sup = Supervisor(pipeline, _noop, _noop, tmp_path, 1.0, 1.0)  # type: ignore[arg-type]
    await sup._restore_trainer(SimpleNamespace(name="actor0"))  # type: ignore[arg-type]
    assert calls == [("load", {"path": str(tmp_path / "step_000004")})]


async def test_missing_checkpoint_fails_with_advice(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 3)
    pipeline = SimpleNamespace(version=3, trained_version=4, call=_noop)
    sup = Supervisor(pipeline, _noop, _noop, tmp_path, 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"checkpoint\.every=1"):
        await sup._restore_trainer(SimpleNamespace(name="actor0"))  # type: ignore[arg-type]
