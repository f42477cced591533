"""Which worker of a role takes the next batch: the least loaded one (join the shortest queue).

A stage with several workers of its role hands each batch, as soon as the index has one, to
the worker with the fewest rows in flight (counted from when the batch is handed out: a stage
hands out a step's batches one after another before any of their calls starts); between equally
loaded workers, to the one that has recently been faster per row. A slow worker keeps its rows
longer, so new batches go elsewhere: the faster worker takes more, and a worker that stalls
stops getting work. Measured (``tests/e2e/test_two_workers.py``, 10 steps of 8 groups, one of
two rollout workers slowed by 0.4 s per call): the slowed worker generated 26 of 80 groups.

Why not one loop per worker slot, each asking the index for its next batch (as the stages
used to run)? The index hands batches to waiting consumers in arrival order, and every worker
had more waiting slots than there was work (one per group that admission lets be in flight):
whole steps went to the workers in turn whatever their speed -- a worker slowed by 0.4 s per call
got 48 of 80 groups, as many as when it was not slowed (``tests/e2e/test_two_workers.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: weight of the newest call in the per-row time average
EWMA = 0.3


class LeastLoaded:
    """Rows in flight and recent seconds per row, per worker name."""

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}
        self._per_row: dict[str, float] = {}

    def load(self, name: str) -> int:
        """Rows handed to ``name`` and not finished yet."""
        return self._rows.get(name, 0)

    def pick(self, names: Sequence[str], rows: int) -> str:
        """The least loaded of ``names`` (ties: the faster per row lately, then the first),
        which from now on counts ``rows`` more in flight -- until :meth:`done`. Counted at once:
        a stage hands out a step's batches one after another before any of its calls starts."""
        if not names:
            raise ValueError("no worker to pick from")
        name = min(names, key=lambda n: (self._rows.get(n, 0), self._speed(n), names.index(n)))
        self._rows[name] = self._rows.get(name, 0) + rows
        return name

    def _speed(self, name: str) -> float:
        """Recent seconds per row; a worker not measured yet counts as fastest while idle (so
        it is tried) and as slowest while busy (its first call has not come back, while an
        equally loaded worker's did)."""
        if name in self._per_row:
            return self._per_row[name]
        return math.inf if self._rows.get(name, 0) else 0.0

    def done(self, name: str, rows: int, seconds: float | None) -> None:
        """``rows`` picked for ``name`` are no longer in flight; a call that succeeded took
        ``seconds`` (``None``: it failed, which says nothing about the worker's speed)."""
        self._rows[name] -= rows
        if seconds is None:
            return
        per_row = seconds / max(rows, 1)
        old = self._per_row.get(name)
        self._per_row[name] = per_row if old is None else (1 - EWMA) * old + EWMA * per_row
