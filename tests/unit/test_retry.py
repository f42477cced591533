"""The controller's one retry policy (:class:`asyncflow.controller.retry.Retry`): failures in a
row counted and logged, the budget's last failure fails the run naming what and why, errors that
would only repeat raised at once, and the supervisor's deadline form."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asyncflow.controller.pool import WorkerError
from asyncflow.controller.retry import Retry, backoff_s
from asyncflow.transfer.client import TransferError


class FakeLog:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def metrics(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def now(self) -> float:
        return 0.0


def failing(times: int, error: Exception) -> Any:
    """An attempt that fails ``times`` times, then returns the attempt numbers it saw."""
    seen: list[int] = []

    async def attempt(n: int) -> list[int]:
        seen.append(n)
        if len(seen) <= times:
            raise error
        return seen

    return attempt


def test_the_back_off_doubles_from_a_tenth_of_a_second_to_two() -> None:
    assert [backoff_s(n) for n in (1, 2, 3, 5, 6, 30)] == [0.1, 0.2, 0.4, 1.6, 2.0, 2.0]


async def test_failures_are_logged_and_the_attempt_numbers_count_them() -> None:
    log = FakeLog()
    retry = Retry(log, 3, pause_s=lambda _: 0.0)
    seen = await retry.call("reward on reward0", failing(2, TransferError("reward0", "gone")))
    assert seen == [0, 1, 2]
    assert [(r["event"], r["what"], r["attempt"]) for r in log.records] == [
        ("retry", "reward on reward0", 1),
        ("retry", "reward on reward0", 2),
    ]
    assert "storage unit 'reward0': gone" in log.records[0]["error"]


async def test_one_failure_past_the_budget_fails_with_what_and_why() -> None:
    retry = Retry(FakeLog(), 2, pause_s=lambda _: 0.0)
    error = WorkerError("actor0", "connection reset")
    with pytest.raises(
        RuntimeError, match="train step 3: failed 3 times in a row; last error: "
    ) as e:
        await retry.call("train step 3", failing(3, error))
    assert e.value.__cause__ is error


async def test_other_errors_and_given_up_ones_are_raised_at_once() -> None:
    log = FakeLog()
    retry = Retry(log, 5, pause_s=lambda _: 0.0)
    with pytest.raises(ValueError):
        await retry.call("x", failing(1, ValueError("a bug")))
    answered = WorkerError("rollout0", "HTTP 500", 500)
    with pytest.raises(WorkerError):
        await retry.call("x", failing(1, answered), give_up=lambda e: e is answered)
    assert log.records == []


async def test_the_deadline_form_raises_the_error_itself_once_time_is_up() -> None:
    log = FakeLog()
    retry = Retry(log, within_s=0.05, pause_s=lambda _: 0.02)
    error = WorkerError("rollout1", "connection refused")
    with pytest.raises(WorkerError) as e:
        await asyncio.wait_for(retry.call("re-forming", failing(1000, error)), 5)
    assert e.value is error and 1 <= len(log.records) < 10
