"""User reward functions: loading them by ``"module:function"`` and scoring with them safely.

This module owns the boundary between AsyncFlow and code it does not trust to behave: a user's
reward function may raise, return garbage, hang on I/O or spin in a pure-Python busy loop. The
``RewardScorer`` turns each of those into a recorded failure (``RewardResult.failed``) for that
one sample, within ``timeout_s``, and never crashes or blocks the caller's event loop.

How: with ``isolate=True`` (the default) each call runs in one of ``num_workers`` spawned child
processes; a call that overruns its timeout, or a child that dies, gets its process killed and
replaced. The built-in verifiers (``arithmetic_reward`` and ``math_reward`` in
``asyncflow.rewards.math``) are cheap and trusted: pass them with ``isolate=False`` to run
in-process (sync functions then run in a thread, so a hang is reported as a timeout but the
thread cannot be stopped: run in-process only code you trust).

The ``FailurePolicy`` says what the caller should do with a failed sample: ``zero`` (train on it
with score 0) or ``regenerate`` (drop it and sample again). The scorer only records it; the
failed result's score is always 0.0.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import multiprocessing
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from multiprocessing.connection import Connection
from typing import Any

RewardCallable = Callable[[str, str, str], Any]  # (prompt, response, answer) -> float | awaitable


class FailurePolicy(StrEnum):
    """What the caller does with a sample whose reward failed."""

    ZERO = "zero"  # keep the sample, score 0
    REGENERATE = "regenerate"  # drop the sample and generate another


@dataclass(frozen=True, slots=True)
class RewardResult:
    """The outcome of scoring one sample."""

    score: float
    failed: bool = False
    error: str | None = None  # "TimeoutError: ...", "ValueError: ...": why it failed
    duration_s: float = 0.0
    policy: FailurePolicy | None = None  # set on failed results: what the caller should do


def load_reward_function(spec: str) -> RewardCallable:
    """The callable named by ``"package.module:function"`` (``function`` may be dotted)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"reward function {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"reward function {spec!r}: module {module_name!r} not found ({exc})"
        ) from None
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward function {spec!r}: {module_name!r} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(
            f"reward function {spec!r} is not callable (it is a {type(target).__name__})"
        )
    return target  # type: ignore[no-any-return]


def spec_of(fn: Callable[..., Any]) -> str:
    """The ``"module:qualname"`` spec of a module-level function, for a child process."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(
            f"{fn!r} cannot be imported by a child process: pass a module-level function, a "
            "'module:function' string, or isolate=False"
        )
    return f"{module}:{qualname}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _call(fn: RewardCallable, prompt: str, response: str, answer: str) -> Any:
    """Call ``fn``; an async function (or awaitable result) is run to completion here."""
    out = fn(prompt, response, answer)
    if inspect.isawaitable(out):

        async def _await() -> Any:
            return await out

        out = asyncio.run(_await())
    return out


def _worker_main(spec: str, conn: Connection) -> None:
    """Child process: load the function, then answer ``(prompt, response, answer)`` requests."""
    try:
        fn = load_reward_function(spec)
    except BaseException as exc:
        conn.send(("error", _describe(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        # a list is a batch: one reply per item, in order, so the parent can time each one
        for item in request if isinstance(request, list) else [request]:
            try:
                conn.send(("ok", _call(fn, *item)))
            except BaseException as exc:
                conn.send(("error", _describe(exc)))


class _Worker:
    """One child process and its pipe."""

    def __init__(self, spec: str, start_timeout_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(spec, child), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(start_timeout_s):
            self.kill()
            raise RuntimeError(f"reward worker for {spec!r} did not start in {start_timeout_s}s")
        try:
            status, detail = self.conn.recv()
        except (EOFError, OSError):
            status, detail = "died", f"exit code {self.process.exitcode}"
        if status != "ready":
            self.kill()
            raise RuntimeError(f"reward worker for {spec!r} failed to load it: {detail}")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def call_many(
        self, requests: list[tuple[str, str, str]], timeout_s: float
    ) -> tuple[list[tuple[str, Any, float]], str | None, str]:
        """Blocking: send a batch, then wait up to ``timeout_s`` for each reply in turn.

        Returns the ``(status, value, seconds)`` of the items answered, and, if the batch stopped
        early, ``"timeout"`` or ``"died"`` with a message for the next item (whose process
        must then be replaced); otherwise ``None, ""``.
        """
        self.conn.send(requests)
        out: list[tuple[str, Any, float]] = []
        t0 = time.perf_counter()
        for _ in requests:
            if not self.conn.poll(timeout_s):
                return out, "timeout", f"TimeoutError: no result within {timeout_s:g}s"
            try:
                status, value = self.conn.recv()
            except (EOFError, OSError):
                return out, "died", f"reward worker died (exit code {self.process.exitcode})"
            t1 = time.perf_counter()
            out.append((status, value, t1 - t0))
            t0 = t1
        return out, None, ""


def _as_score(value: Any) -> float:
    """The value as a finite float; raises ``TypeError``/``ValueError`` otherwise.

    Any real number is a score: ``int``, ``float``, ``bool`` (``pred == answer``: 1.0 or 0.0),
    ``Fraction``, numpy scalars; so is a single value held in a 0-d array (numpy, torch: what a
    ``.sum()`` or ``.mean()`` returns), read with ``.item()``."""
    number = value
    if not isinstance(number, numbers.Real) and getattr(value, "ndim", None) == 0:
        item = getattr(value, "item", None)
        if callable(item):
            number = item()  # np.bool_, 0-d ndarray, 0-d torch tensor
    if not isinstance(number, numbers.Real):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise TypeError(f"reward function returned {type(value).__name__} {shown}, not a number")
    try:
        score = float(number)
    except OverflowError:  # an int beyond the float range
        score = math.inf
    if not math.isfinite(score):
        raise ValueError(f"reward function returned {score}, not a finite number")
    return score


class RewardScorer:
    """Scores samples with one reward function, bounding each call by ``timeout_s``.

    ``fn`` is a ``"module:function"`` string or a callable. Use as ``async with`` or call
    ``aclose()``; child processes start on first use (or in ``start()``).
    """

    def __init__(
        self,
        fn: str | RewardCallable,
        *,
        timeout_s: float = 5.0,
        num_workers: int = 1,
        isolate: bool = True,
        failure_policy: FailurePolicy | str = FailurePolicy.ZERO,
        start_timeout_s: float = 60.0,
    ) -> None:
        if timeout_s <= 0 or num_workers < 1:
            raise ValueError(
                f"need timeout_s > 0 and num_workers >= 1, got {timeout_s}, {num_workers}"
            )
        self.fn = load_reward_function(fn) if isinstance(fn, str) else fn
        self.spec = fn if isinstance(fn, str) else (spec_of(fn) if isolate else repr(fn))
        self.timeout_s = timeout_s
        self.isolate = isolate
        self.failure_policy = FailurePolicy(failure_policy)
        self.start_timeout_s = start_timeout_s
        self._num_workers = num_workers
        self._started = 0
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()
        self._closed = False

    async def __aenter__(self) -> RewardScorer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the child processes now rather than on the first call."""
        while self.isolate and self._started < self._num_workers:
            self._started += 1
            await self._idle.put(await self._spawn())

    async def _spawn(self) -> _Worker:
        worker = await asyncio.to_thread(_Worker, self.spec, self.start_timeout_s)
        self._all.add(worker)
        return worker

    async def _retire(self, worker: _Worker) -> None:
        self._all.discard(worker)
        await asyncio.to_thread(worker.kill)

    def _failure(self, error: str, t0: float) -> RewardResult:
        duration = time.perf_counter() - t0
        return RewardResult(0.0, True, error, duration, self.failure_policy)

    async def score(self, prompt: str, response: str, answer: str) -> RewardResult:
        """Score one sample. Never raises for a misbehaving reward function."""
        if self._closed:
            raise RuntimeError("RewardScorer is closed")
        t0 = time.perf_counter()
        if not self.isolate:
            return await self._score_in_process(prompt, response, answer, t0)
        return (await self._score_chunk_in_workers([(prompt, response, answer)]))[0]

    async def score_many(self, items: Sequence[tuple[str, str, str]]) -> list[RewardResult]:
        """Score a batch of ``(prompt, response, answer)``; the same results as ``score`` on
        each item (every item still has its own ``timeout_s``), with one hand-off per worker
        process or thread instead of one per item."""
        if self._closed:
            raise RuntimeError("RewardScorer is closed")
        items = list(items)
        if not items:
            return []
        if not self.isolate:
            if inspect.iscoroutinefunction(self.fn):
                t0 = time.perf_counter()
                return list(
                    await asyncio.gather(*(self._score_in_process(*it, t0) for it in items))
                )
            return await self._score_many_in_threads(items)
        # contiguous chunks, one per worker process (starting the missing ones)
        n = min(self._num_workers, len(items))
        size = -(-len(items) // n)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        parts = await asyncio.gather(*(self._score_chunk_in_workers(c) for c in chunks))
        return [r for part in parts for r in part]

    async def _worker(self, t0: float) -> _Worker | RewardResult:
        """An idle worker (starting one if fewer than ``num_workers`` run), or the failure."""
        if self._started < self._num_workers and self._idle.empty():
            self._started += 1
            try:
                await self._idle.put(await self._spawn())
            except RuntimeError as exc:
                self._started -= 1
                return self._failure(str(exc), t0)
        return await self._idle.get()

    async def _score_chunk_in_workers(
        self, items: list[tuple[str, str, str]]
    ) -> list[RewardResult]:
        results: list[RewardResult] = []
        while len(results) < len(items):
            t0 = time.perf_counter()
            worker = await self._worker(t0)
            if isinstance(worker, RewardResult):  # no process could start: fail the rest
                results += [worker] * (len(items) - len(results))
                break
            healthy = False
            try:
                answered, stop, why = await asyncio.to_thread(
                    worker.call_many, items[len(results) :], self.timeout_s
                )
                for status, value, seconds in answered:
                    results.append(self._result(status, value, seconds))
                if stop is not None:  # this item overran or killed the process
                    results.append(self._result("error", why, self.timeout_s))
                healthy = stop is None
            finally:
                if healthy:
                    self._idle.put_nowait(worker)
                else:  # timed out, died or we were cancelled mid-call: replace the process
                    await self._replace(worker)
        return results

    def _result(self, status: str, value: Any, seconds: float) -> RewardResult:
        if status != "ok":
            return RewardResult(0.0, True, str(value), seconds, self.failure_policy)
        try:
            return RewardResult(_as_score(value), duration_s=seconds)
        except (TypeError, ValueError) as exc:
            return RewardResult(0.0, True, _describe(exc), seconds, self.failure_policy)

    async def _score_many_in_threads(self, items: list[tuple[str, str, str]]) -> list[RewardResult]:
        """A sync in-process function: the batch runs in one thread, item after item. An item
        that overruns ``timeout_s`` fails, its thread is abandoned (a thread cannot be
        stopped) and the rest of the batch goes on in a new one."""
        loop = asyncio.get_running_loop()
        results: list[RewardResult] = []
        while len(results) < len(items):
            replies: asyncio.Queue[tuple[str, Any, float]] = asyncio.Queue()
            todo = items[len(results) :]
            stop = threading.Event()  # set when this thread is abandoned: score nothing more

            def run(
                todo: list[tuple[str, str, str]] = todo,
                q: asyncio.Queue[tuple[str, Any, float]] = replies,
                stop: threading.Event = stop,
            ) -> None:
                for item in todo:
                    if stop.is_set():
                        return
                    t0 = time.perf_counter()
                    try:
                        status, value = "ok", self.fn(*item)
                    except Exception as exc:
                        status, value = "error", _describe(exc)
                    reply = (status, value, time.perf_counter() - t0)
                    try:
                        loop.call_soon_threadsafe(q.put_nowait, reply)
                    except RuntimeError:  # the loop is gone: nobody is waiting any more
                        return

            thread = loop.run_in_executor(None, run)
            try:
                for _ in todo:
                    try:
                        async with asyncio.timeout(self.timeout_s):
                            status, value, seconds = await replies.get()
                            if status == "ok" and inspect.isawaitable(value):
                                value = await value
                    except TimeoutError:
                        why = f"TimeoutError: no result within {self.timeout_s:g}s"
                        results.append(self._result("error", why, self.timeout_s))
                        break  # the thread is stuck on this item: the rest in a new one
                    except Exception as exc:  # an awaitable result that raised
                        status, value, seconds = "error", _describe(exc), 0.0
                    results.append(self._result(status, value, seconds))
                else:
                    await thread
            finally:
                stop.set()
        return results

    async def _replace(self, worker: _Worker) -> None:
        await self._retire(worker)
        if self._closed:
            return
        try:
            self._idle.put_nowait(await self._spawn())
        except RuntimeError:
            self._started -= 1  # the next call retries the start

    async def _score_in_process(
        self, prompt: str, response: str, answer: str, t0: float
    ) -> RewardResult:
        try:
            async with asyncio.timeout(self.timeout_s):
                if inspect.iscoroutinefunction(self.fn):
                    value = await self.fn(prompt, response, answer)
                else:
                    value = await asyncio.to_thread(self.fn, prompt, response, answer)
                    if inspect.isawaitable(value):
                        value = await value
            score = _as_score(value)
        except TimeoutError:
            return self._failure(f"TimeoutError: no result within {self.timeout_s:g}s", t0)
        except Exception as exc:
            return self._failure(_describe(exc), t0)
        return RewardResult(score, duration_s=time.perf_counter() - t0)

    async def aclose(self) -> None:
        """Stop every child process."""
        self._closed = True
        workers, self._all = list(self._all), set()
        for worker in workers:
            await asyncio.to_thread(worker.kill)


__all__ = [
    "FailurePolicy",
    "RewardCallable",
    "RewardResult",
    "RewardScorer",
    "load_reward_function",
    "spec_of",
]
