"""How the controller runs things side by side: ``asyncio.TaskGroup``, every task named.

Three shapes cover every use, and a failure always comes out as itself (the first one), never
wrapped in an ``ExceptionGroup`` -- callers catch ``WorkerError``, ``ConfigError``... as such:

- :func:`all_of`: run coroutines together, all or none -- the first failure cancels the others
  (PPO's actor and critic steps; a call to every rank);
- :func:`run_until`: a main coroutine with background loops beside it -- a loop failing fails the
  main at once, the main returning cancels the loops (the step driver and the stage loops);
- :func:`task_group` / :func:`background`: a scope that owns tasks created as it goes; a
  ``background`` scope cancels what still runs when its block ends instead of waiting for it
  (storage frees, worker watches).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf exception of a (possibly nested) exception group."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _reraise(group: BaseExceptionGroup[Any]) -> NoReturn:
    error = first_error(group)
    raise error from error.__cause__  # keeps its own cause; hides the group


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """An ``asyncio.TaskGroup`` whose failure is raised as itself: the first task to fail (or
    the block) cancels the rest and its error propagates."""
    try:
        async with asyncio.TaskGroup() as tg:
            yield tg
    except BaseExceptionGroup as group:
        _reraise(group)


async def all_of(named: Iterable[tuple[str, Coroutine[Any, Any, T]]]) -> list[T]:
    """Run ``(name, coroutine)`` pairs as named tasks; their results in order. The first
    failure cancels the others and is raised as itself: none is left running unowned."""
    async with task_group() as tg:
        tasks = [tg.create_task(coro, name=name) for name, coro in named]
    return [t.result() for t in tasks]


class _Finished(Exception):
    """Ends :func:`run_until`'s group once the main coroutine returned; carries its result."""

    def __init__(self, result: Any) -> None:
        super().__init__("finished")
        self.result = result


async def run_until(
    main: Coroutine[Any, Any, T],
    background: Mapping[str, Coroutine[Any, Any, Any]],
    *,
    name: str = "main",
) -> T:
    """``await main`` with the ``background`` coroutines (name -> coroutine) running beside it:
    the first of them to fail fails ``main`` at once (it is cancelled) and is raised; when
    ``main`` returns (or raises), the background tasks still running are cancelled."""

    async def finish() -> NoReturn:
        raise _Finished(await main)

    try:
        async with asyncio.TaskGroup() as tg:
            for task_name, coro in background.items():
                tg.create_task(coro, name=task_name)
            tg.create_task(finish(), name=name)
    except BaseExceptionGroup as group:
        finished, rest = group.split(_Finished)
        if rest is not None:
            _reraise(rest)
        assert finished is not None
        done = first_error(finished)
        assert isinstance(done, _Finished)
        result: T = done.result
        return result
    raise AssertionError("run_until: the main task ended without finishing")  # pragma: no cover


class _End(Exception):
    """Ends a :func:`background` scope: asyncio's documented way to stop a TaskGroup early."""


async def _end() -> NoReturn:
    raise _End


@contextlib.asynccontextmanager
async def background(name: str) -> AsyncIterator[asyncio.TaskGroup]:
    """A scope for best-effort background tasks: when the block ends, the tasks still running
    are cancelled rather than waited for. A task failing fails the block (so such tasks catch
    what they may meet); the block failing cancels them."""
    try:
        async with asyncio.TaskGroup() as tg:
            yield tg
            tg.create_task(_end(), name=f"{name}-end")
    except BaseExceptionGroup as group:
        _, rest = group.split(_End)
        if rest is not None:
            _reraise(rest)
