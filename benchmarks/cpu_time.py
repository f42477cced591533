"""CPU time of a run's processes, per role, read from /proc (Linux): what each step costs.

The headline benchmark uses it to show where a step's CPU goes in each mode and what that
implies: an asynchronous step cannot take less wall time than its own CPU work spread over
every core of the machine, so ``sync wall per step / (async CPU per step / cores)`` bounds the
async/sync ratio on this machine, however well the stages overlap.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(c) for c in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / TICK  # utime + stime, every thread


def _role(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            args = f.read().split("\0")
    except OSError:
        return None
    return args[args.index("--role") + 1] if "--role" in args[:-1] else None


def snapshot(root: int | None = None) -> dict[str, float]:
    """CPU seconds so far of ``root`` (this process: ``controller``) and every descendant,
    summed per worker role; a worker's own children (e.g. reward sandboxes) count for it."""
    root = os.getpid() if root is None else root
    totals: dict[str, float] = {}
    stack = [(root, "controller")]
    while stack:
        pid, label = stack.pop()
        label = _role(pid) or label
        try:
            totals[label] = totals.get(label, 0.0) + _cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
        stack += [(c, label) for c in _children(pid)]
    return totals


@dataclass
class StepClock:
    """CPU per role and wall time between two training steps of a run in this process."""

    steps: int = 0
    wall_s: float = 0.0
    cpu_s: dict[str, float] | None = None

    def per_step_ms(self) -> dict[str, float]:
        return {k: 1000 * v / max(self.steps, 1) for k, v in (self.cpu_s or {}).items()}

    @property
    def wall_ms(self) -> float:
        return 1000 * self.wall_s / max(self.steps, 1)

    @property
    def cpu_ms(self) -> float:
        return sum(self.per_step_ms().values())


async def watch(metrics: Path, first: int, last: int, clock: StepClock) -> None:
    """Snapshot when ``first`` and ``last`` step records have been written to ``metrics``
    (read incrementally, every 50 ms: this runs in the controller's own process)."""
    marks: list[tuple[int, float, dict[str, float]]] = []
    offset, steps, tail = 0, 0, b""
    while len(marks) < 2:
        await asyncio.sleep(0.05)
        try:
            chunk = _read_from(metrics, offset)
        except OSError:
            continue
        offset += len(chunk)
        *lines, tail = (tail + chunk).split(b"\n")
        steps += sum(1 for x in lines if x.strip() and b'"event"' not in x)
        if steps >= (first if not marks else last):
            marks.append((steps, time.monotonic(), snapshot()))
    (n0, t0, c0), (n1, t1, c1) = marks
    clock.steps, clock.wall_s = n1 - n0, t1 - t0
    clock.cpu_s = {k: c1[k] - c0.get(k, 0.0) for k in c1}


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def available() -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/task")
