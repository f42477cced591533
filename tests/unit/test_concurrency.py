"""The TaskGroup shapes the controller's tasks live in (:mod:`asyncflow.controller.concurrency`):
a failure comes out as itself, never as an ExceptionGroup; a background scope cancels what is
left when its block ends. (``all_of`` and ``run_until``: ``test_driver.py``.)"""

from __future__ import annotations

import asyncio

import pytest

from asyncflow.controller.concurrency import background, task_group
from asyncflow.controller.pool import WorkerError


async def test_a_task_group_raises_its_first_failure_as_itself() -> None:
    async def fail() -> None:
        await asyncio.sleep(0.01)
        raise WorkerError("actor0", "connection reset")

    with pytest.raises(WorkerError, match="actor0"):
        async with task_group() as tg:
            tg.create_task(fail(), name="fail")
            await asyncio.Event().wait()  # cancelled by the failure
    with pytest.raises(KeyError):  # the block's own error too
        async with task_group() as tg:
            tg.create_task(asyncio.sleep(1), name="sleep")
            raise KeyError("x")


async def test_a_cause_survives_the_unwrapping() -> None:
    async def fail() -> None:
        try:
            raise OSError("disk full")
        except OSError as e:
            raise RuntimeError("save failed") from e

    with pytest.raises(RuntimeError) as e:
        async with task_group() as tg:
            tg.create_task(fail(), name="fail")
    assert isinstance(e.value.__cause__, OSError)


async def test_a_background_scope_cancels_what_is_left_and_returns() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async with background("frees") as tg:
        tg.create_task(forever(), name="forever")
        await asyncio.sleep(0)
    assert cancelled.is_set()
    with pytest.raises(KeyError):
        async with background("frees") as tg:
            tg.create_task(forever(), name="forever")
            raise KeyError("x")
