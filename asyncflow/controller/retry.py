"""Trying again what a dying worker interrupted: the controller's one retry policy.

A worker that dies mid-request fails the call (:class:`~asyncflow.controller.pool.WorkerError`)
or a pull it made from another worker (:class:`~asyncflow.transfer.client.TransferError`); the
supervisor replaces it within seconds. So everything that talks to workers -- a stage call, a
training step, its commit, a weight sync, an evaluation -- runs through :meth:`Retry.call`:

- every failure is a ``{"event": "retry", "what", "error", "attempt", "time_s"}`` line in
  ``metrics.jsonl``, followed by a back-off (0.1 s doubling to 2 s, :func:`backoff_s`: time for a
  replacement to start);
- ``timeouts.retries`` failed tries in a row are allowed; one more fails the run with
  ``"<what>: failed N times in a row; last error: ..."``;
- ``give_up`` names the errors that are raised at once, counted or not (a worker that answered
  with an error would only repeat it; a commit whose ranks died must redo the whole step).

The supervisor's re-forming of the weight-sync group retries through it too, with a deadline
instead of a count and a fixed pause (``within_s``, ``pause_s``); then the error itself is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from asyncflow.controller.pool import WorkerError
from asyncflow.transfer.client import TransferError

T = TypeVar("T")

#: what a dying worker makes a call raise: worth trying again once it is replaced
RETRYABLE: tuple[type[Exception], ...] = (WorkerError, TransferError)


class EventLog(Protocol):
    """Where retries are recorded (a :class:`~asyncflow.runlog.RunLog`)."""

    def metrics(self, record: dict[str, Any]) -> None: ...

    def now(self) -> float: ...


def backoff_s(failures: int) -> float:
    """The wait after the ``failures``-th failure in a row: 0.1 s doubling, at most 2 s."""
    return min(0.05 * 2**failures, 2.0)


def _never(_: BaseException) -> bool:
    return False


class Retry:
    """``limit`` failed tries in a row allowed (one more fails the run), or, with ``within_s``,
    as many as fit in that many seconds from the first try."""

    def __init__(
        self,
        log: EventLog,
        limit: int | None = None,
        *,
        within_s: float | None = None,
        pause_s: Callable[[int], float] = backoff_s,
    ) -> None:
        self.log = log
        self.limit = limit
        self.within_s = within_s
        self.pause_s = pause_s

    async def call(
        self,
        what: str,
        attempt: Callable[[int], Awaitable[T]],
        *,
        give_up: Callable[[BaseException], bool] = _never,
    ) -> T:
        """``await attempt(n)`` until it returns, ``n`` the failures so far (a training step
        tells its ranks which attempt a micro-batch belongs to); raises what is not
        :data:`RETRYABLE`, what ``give_up`` says to, and the failure past the budget."""
        loop = asyncio.get_running_loop()
        deadline = None if self.within_s is None else loop.time() + self.within_s
        failures = 0
        while True:
            try:
                return await attempt(failures)
            except RETRYABLE as e:
                if give_up(e) or (deadline is not None and loop.time() > deadline):
                    raise
                failures = self.failed(what, e, failures)
            await asyncio.sleep(self.pause_s(failures))

    def failed(self, what: str, error: BaseException, failures: int) -> int:
        """Record one more failure of ``what``; returns the count, or raises past the limit."""
        failures += 1
        self.log.metrics(
            {
                "event": "retry",
                "what": what,
                "error": str(error)[:300],
                "attempt": failures,
                "time_s": self.log.now(),
            }
        )
        if self.limit is not None and failures > self.limit:
            raise RuntimeError(
                f"{what}: failed {failures} times in a row; last error: {error}"
            ) from error
        return failures
