"""Step-ordered admission in the rollout worker (``workers/rollout.py: StepOrder``)."""

from __future__ import annotations

import asyncio

import pytest

from asyncflow.workers.rollout import StepOrder


async def _hold(order: StepOrder, step: int, log: list[str], release: asyncio.Event) -> None:
    async with order.turn(step):
        log.append(f"in {step}")
        await release.wait()
    log.append(f"out {step}")


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_newer_step_waits_for_every_older_batch() -> None:
    order, log = StepOrder(), []
    gates = {name: asyncio.Event() for name in ("a", "b", "c")}
    t1a = asyncio.create_task(_hold(order, 1, log, gates["a"]))
    t1b = asyncio.create_task(_hold(order, 1, log, gates["b"]))  # same step: runs alongside
    await _settle()
    t2 = asyncio.create_task(_hold(order, 2, log, gates["c"]))
    await _settle()
    assert log == ["in 1", "in 1"] and order.running() == {1: 2}
    gates["a"].set()
    await _settle()
    assert "in 2" not in log  # one batch of step 1 is still generating
    gates["b"].set()
    await _settle()
    assert log[-1] == "in 2" and order.running() == {2: 1}
    gates["c"].set()
    await asyncio.gather(t1a, t1b, t2)
    assert order.running() == {}


async def test_an_older_step_is_never_held_back() -> None:
    order, log = StepOrder(), []
    gate = asyncio.Event()
    newer = asyncio.create_task(_hold(order, 5, log, gate))
    await _settle()
    older = asyncio.create_task(_hold(order, 3, log, gate))  # e.g. a regenerated group
    await _settle()
    assert log == ["in 5", "in 3"]
    gate.set()
    await asyncio.gather(newer, older)


@pytest.mark.parametrize("cancel", ["waiting", "running"])
async def test_cancelled_batches_give_their_place_back(cancel: str) -> None:
    order, log = StepOrder(), []
    gate, never = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(_hold(order, 1, log, never if cancel == "running" else gate))
    await _settle()
    second = asyncio.create_task(_hold(order, 2, log, gate))
    await _settle()
    victim = first if cancel == "running" else second
    victim.cancel()
    await _settle()
    if cancel == "running":  # step 1 was cancelled mid-generation: step 2 goes in
        assert log[-1] == "in 2"
        gate.set()
        await second
    else:
        gate.set()
        await first
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert order.running() == {}
    third = asyncio.create_task(_hold(order, 9, log, gate))
    await asyncio.wait_for(third, 5)  # nothing left behind blocks a later step


async def test_disabled_admits_everything_at_once() -> None:
    order, log = StepOrder(enabled=False), []
    gate = asyncio.Event()
    tasks = [asyncio.create_task(_hold(order, s, log, gate)) for s in (1, 2, 3)]
    await _settle()
    assert log == ["in 1", "in 2", "in 3"]
    gate.set()
    await asyncio.gather(*tasks)
