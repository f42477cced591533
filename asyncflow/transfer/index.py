"""The sample index: which sample has which field ready, where it lives, who has consumed it.

This is the paper's TransferQueue *controller*, kept in the controller process's memory. It
holds metadata only -- never a tensor. Rows are samples with a global integer id; a GRPO group is
one prompt's ``n`` responses and shares a group id. Columns are named fields
(``response_ids``, ``rollout_logprobs``, ``reward``...).

Per (row, column) it records: ready or not, the storage unit holding it, shape, dtype and the
policy version that produced it. Per consuming *task* it records which rows are ready for the
task (all required columns ready), handed out but not yet acknowledged (``leased``), or consumed.

Costs are O(rows touched) by construction:

- every task keeps its own ready queue, fed incrementally by :meth:`mark_ready`, so handing out
  a batch never scans resident rows;
- queue entries are invalidated lazily (an entry is checked when popped), so marking rows lost
  or re-queued costs only the rows involved;
- each storage unit keeps the set of rows it holds, so losing a unit touches only its rows.

Consumers wait on a per-task future list, resolved synchronously by producers: a waiting
consumer never delays a producer or a consumer of another task, and nothing polls.

Exactly-once per task: :meth:`get_batch` *leases* rows to a task; :meth:`ack` consumes them;
:meth:`requeue` (a consumer died, a batch was abandoned) makes them ready again. A row is
released -- its storage units told to free it -- once every registered task has acked it.
Each handed-out batch has its own lease id (:attr:`BatchMeta.lease`); given it, ``complete``,
``ack`` and ``requeue`` act only on rows that lease still holds, so a late reply of an old call
never counts for rows a newer call holds. Leases are not snapshotted.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class FieldMeta:
    """Where one column of one row lives, and what it is."""

    unit: str
    shape: tuple[int, ...]
    dtype: str
    version: int


@dataclass(slots=True)
class _Row:
    group: int
    meta: dict[str, Any]
    fields: dict[str, FieldMeta] = field(default_factory=dict)
    acked_by: int = 0  # number of tasks that consumed it
    # units holding a superseded copy of some field: freed with the row, not at once -- a
    # free sent now could arrive after the recomputed field is put there again
    stale_units: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Group:
    rows: list[int]


@dataclass(slots=True)
class _Queue:
    """Items (row ids, or group ids for a group task) ready for one task in one partition."""

    ready: deque[int] = field(default_factory=deque)  # oldest first
    queued: set[int] = field(default_factory=set)  # ids currently in ready (maybe stale)
    waiters: deque[_Waiter] = field(default_factory=deque)


@dataclass(slots=True)
class _Task:
    name: str
    requires: tuple[str, ...]
    produces: tuple[str, ...]
    groups: bool
    partition: str | None = None  # row-meta key that splits the ready queue (e.g. "step")
    queues: dict[Any, _Queue] = field(default_factory=dict)
    # row ids handed out, not acked -> the lease (handed-out batch) that holds them
    leased: dict[int, _Lease] = field(default_factory=dict)
    consumed: set[int] = field(default_factory=set)  # row ids acked
    required: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _Lease:
    """One handed-out batch: shared by the rows it holds."""

    id: int  # unique within the index's life; BatchMeta.lease
    losses: int  # the index's count of lost units when handed out


@dataclass(slots=True)
class _Waiter:
    n: int
    future: asyncio.Future[BatchMeta]
    at_least: int


@dataclass(frozen=True, slots=True)
class BatchMeta:
    """What a consumer needs to pull a batch: row ids (in batch order) and field locations."""

    task: str
    rows: list[int]
    groups: list[int]
    fields: dict[str, list[FieldMeta]]  # column -> one FieldMeta per row, in row order
    meta: list[dict[str, Any]]
    lease: int = -1  # the lease holding the rows (see SampleIndex.complete); -1: none

    def by_unit(self, column: str) -> dict[str, list[int]]:
        """Row ids of ``column`` grouped by the storage unit that holds them."""
        out: dict[str, list[int]] = {}
        for row, fm in zip(self.rows, self.fields[column]):
            out.setdefault(fm.unit, []).append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "rows": self.rows,
            "groups": self.groups,
            "meta": self.meta,
            "fields": {
                col: [[f.unit, list(f.shape), f.dtype, f.version] for f in fms]
                for col, fms in self.fields.items()
            },
            "lease": self.lease,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchMeta:
        return cls(
            task=str(data["task"]),
            rows=[int(r) for r in data["rows"]],
            groups=[int(g) for g in data["groups"]],
            meta=list(data["meta"]),
            fields={
                col: [FieldMeta(u, tuple(s), d, int(v)) for u, s, d, v in fms]
                for col, fms in data["fields"].items()
            },
            lease=int(data.get("lease", -1)),
        )


class SampleIndex:
    """In-memory metadata index of sample readiness; see the module docstring."""

    def __init__(self, on_release: Callable[[dict[str, list[int]]], None] | None = None) -> None:
        self._rows: dict[int, _Row] = {}
        self._groups: dict[int, _Group] = {}
        self._tasks: dict[str, _Task] = {}
        self._by_column: dict[str, list[_Task]] = {}  # column -> tasks that require it
        self._producer: dict[str, str] = {}  # column -> task that produces it
        self._unit_rows: dict[str, dict[int, set[str]]] = {}  # unit -> row -> columns
        self._next_row = 0
        self._next_group = 0
        self._lease_ids = itertools.count()  # BatchMeta.lease of the next batch handed out
        self._on_release = on_release
        self._touched: list[tuple[_Task, _Queue]] = []  # queues with waiters that got items
        self.released_rows = 0
        self.lost_fields = 0
        self._losses = 0  # units marked lost so far
        self._lost_at: dict[str, int] = {}  # unit -> value of _losses when it was last lost
        self._lost: set[str] = set()  # units lost and not back (see unit_back)

    # ------------------------------------------------------------------ set-up
    def register_task(
        self,
        name: str,
        requires: Sequence[str],
        produces: Sequence[str] = (),
        *,
        groups: bool = False,
        partition: str | None = None,
    ) -> None:
        """Declare a consuming task: the columns it needs, the columns it produces (lineage, used
        to recompute lost data), whether it takes whole groups, and optionally a row-meta key
        (``partition``) whose value a consumer names to take only rows with that value (the
        trainer takes only the rows of the step it is training). Rows (groups) are handed out
        oldest ready first."""
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already registered")
        if not requires:
            raise ValueError(f"task {name!r} must require at least one column")
        if self._rows:
            raise ValueError("register every task before adding rows")
        task = _Task(name, tuple(requires), tuple(produces), groups, partition)
        task.required = frozenset(task.requires)
        self._tasks[name] = task
        for col in task.requires:
            self._by_column.setdefault(col, []).append(task)
        for col in task.produces:
            if col in self._producer:
                raise ValueError(
                    f"column {col!r} is produced by both {self._producer[col]!r} and {name!r}"
                )
            self._producer[col] = name

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def add_group(self, size: int, meta: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Register ``size`` rows forming one group; returns their row ids."""
        if size < 1:
            raise ValueError(f"group size must be >= 1, got {size}")
        if meta is not None and len(meta) != size:
            raise ValueError(f"got {len(meta)} metadata dicts for a group of {size}")
        gid = self._next_group
        self._next_group += 1
        rows = list(range(self._next_row, self._next_row + size))
        self._next_row += size
        for i, rid in enumerate(rows):
            self._rows[rid] = _Row(gid, dict(meta[i]) if meta is not None else {})
        self._groups[gid] = _Group(rows)
        return rows

    def add_rows(self, metas: Sequence[Mapping[str, Any]]) -> list[int]:
        """Register rows that are each their own group."""
        out: list[int] = []
        for m in metas:
            out += self.add_group(1, [m])
        return out

    # ------------------------------------------------------------------ producers
    def mark_ready(
        self,
        rows: Sequence[int],
        column: str,
        unit: str,
        *,
        shapes: Sequence[Sequence[int]] | Sequence[int] | None = None,
        dtype: str = "float32",
        version: int = -1,
    ) -> list[int]:
        """Record that ``column`` of ``rows`` is ready at storage unit ``unit``.

        ``shapes`` is one shape per row (ragged data), or one shape for all. Never awaits.
        A unit marked lost (and not back, see :meth:`unit_back`) holds nothing: its rows are
        skipped and returned, the column stays not ready for them.
        """
        if unit in self._lost:
            return list(rows)
        self._mark_ready(rows, column, unit, _per_row_shapes(shapes, len(rows)), dtype, version)
        return []

    def _mark_ready(
        self,
        rows: Sequence[int],
        column: str,
        unit: str,
        per_row: list[tuple[int, ...]],
        dtype: str,
        version: int,
    ) -> None:
        unit_rows = self._unit_rows.setdefault(unit, {})
        tasks = self._by_column.get(column, ())
        for i, rid in enumerate(rows):
            row = self._rows.get(rid)
            if row is None:
                raise KeyError(f"row {rid} is not registered (or already released)")
            old = row.fields.get(column)
            if old is not None and old.unit != unit:
                self._drop_unit_entry(old.unit, rid, column)
                row.stale_units.add(old.unit)  # its copy there is freed with the row
            row.fields[column] = FieldMeta(unit, per_row[i], dtype, version)
            unit_rows.setdefault(rid, set()).add(column)
            for task in tasks:
                self._maybe_ready(task, rid, row)
        self._wake_touched()

    # ------------------------------------------------------------------ consumers
    async def get_batch(
        self, task: str, n: int, *, partition: Any = None, at_least: int | None = None
    ) -> BatchMeta:
        """Wait for ``n`` rows (or ``n`` whole groups, for a group task) ready for ``task`` (in
        ``partition``, for a partitioned task) and lease them, under a fresh lease id
        (:attr:`BatchMeta.lease`). Bound the wait with ``asyncio.timeout``; on cancellation or
        timeout nothing stays leased.

        With ``at_least`` (``1 <= at_least <= n``) the call returns as soon as that many are
        ready, with every ready one up to ``n``: a streaming stage takes what there is instead of
        waiting for a full batch that may never come (the last rows of a run, a regenerated
        group)."""
        t = self._task(task)
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        least = n if at_least is None else at_least
        if not 1 <= least <= n:
            raise ValueError(f"at_least must be in [1, {n}], got {at_least}")
        q = self._queue(t, partition)
        batch = self._try_take(t, q, n, least)
        if batch is not None:
            return batch
        # The batch's metadata is built when the rows are leased (by the producer's call), so
        # a loss between then and our wake-up only makes the pull fail, never this call.
        fut: asyncio.Future[BatchMeta] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(n, fut, least)
        q.waiters.append(waiter)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                got = fut.result()
                rows = [r for r in got.rows if _holds(t, r, got.lease)]
                self._unlease(t, rows)  # resolved just as we were cancelled
            else:
                fut.cancel()
                if waiter in q.waiters:
                    q.waiters.remove(waiter)
                self._wake(t, q)  # a smaller waiter behind us may be satisfiable now
            raise

    def try_get_batch(
        self, task: str, n: int, *, partition: Any = None, at_least: int | None = None
    ) -> BatchMeta | None:
        """Non-waiting form of :meth:`get_batch`: a batch if one is ready now, else None."""
        t = self._task(task)
        return self._try_take(t, self._queue(t, partition), n, n if at_least is None else at_least)

    def ack(self, task: str, rows: Iterable[int], *, lease: int | None = None) -> list[int]:
        """Mark leased rows consumed by ``task``; releases rows every task has consumed.

        With ``lease`` (a :attr:`BatchMeta.lease`), only rows that lease still holds are acked;
        the others (given back, leased again to a newer call, or invalidated meanwhile) are
        left alone and returned. Without it, every row must be leased to ``task``."""
        t = self._task(task)
        stale: list[int] = []
        if lease is not None:
            mine: list[int] = []
            for rid in rows:
                (mine if _holds(t, rid, lease) else stale).append(rid)
            rows = mine
        release: dict[str, list[int]] = {}
        n_tasks = len(self._tasks)
        for rid in rows:
            if rid not in t.leased:
                raise ValueError(f"row {rid} is not leased to task {task!r}")
            del t.leased[rid]
            t.consumed.add(rid)
            row = self._rows[rid]
            row.acked_by += 1
            if row.acked_by == n_tasks:
                self._release(rid, row, release)
        if release and self._on_release is not None:
            self._on_release(release)
        return stale

    def complete(
        self,
        task: str,
        rows: Sequence[int],
        produced: Mapping[str, tuple[str, Sequence[Sequence[int]] | Sequence[int], str, int]],
        *,
        lease: int | None = None,
    ) -> list[int]:
        """A task finished ``rows``: mark what it produced ready and ack them, atomically.

        ``produced`` maps column -> (unit, shapes, dtype, version). Stale results never enter
        the index; their rows are skipped and returned:

        - rows no longer leased to the task (their inputs were lost and invalidated meanwhile);
        - rows whose results went to a unit marked lost after they were leased (the worker
          replied, then died before this call): nothing was produced, the rows are given back
          to the task (whole groups, for a group task) to be computed again. A unit lost before
          they were leased is back under the same name (a restarted attached worker, a resumed
          run's workers): results there are accepted;
        - with ``lease`` (the :attr:`BatchMeta.lease` of the call that produced the results):
          rows that lease no longer holds -- given back, leased again to a newer call (whose
          results alone count), or invalidated meanwhile. What the old call wrote for them is
          freed with the row. Without ``lease``, any lease of ``rows`` to the task will do.
        """
        t = self._task(task)
        held: Mapping[int, _Lease]
        if lease is None:
            held = t.leased
        else:
            held = {r: hl for r in rows if (hl := t.leased.get(r)) is not None and hl.id == lease}
        dead = {u: self._lost_at[u] for u, *_ in produced.values() if u in self._lost_at}
        redo = {
            r
            for r in rows
            if (hl := held.get(r)) is not None and any(a > hl.losses for a in dead.values())
        }
        if redo and t.groups:
            gids = {self._rows[r].group for r in redo}
            redo |= {r for r in rows if r in held and self._rows[r].group in gids}
        live = [i for i, r in enumerate(rows) if r in held and r not in redo]
        live_rows = [rows[i] for i in live]
        done = set(live_rows)
        units = {unit for unit, *_ in produced.values()}
        for col, (unit, shapes, dtype, version) in produced.items():
            per_row = _per_row_shapes(shapes, len(rows))
            self._mark_ready(live_rows, col, unit, [per_row[i] for i in live], dtype, version)
            if live_rows:
                self._lost.discard(unit)  # a call leased after its loss wrote there: it is back
        for r in redo:
            self._rows[r].stale_units |= units  # anything written there: freed with the row
        self.ack(task, live_rows)
        if redo:
            self._unlease(t, [r for r in rows if r in redo])
        stale = [r for r in rows if r not in done]
        if lease is not None:
            for r in stale:  # a superseded call's copies: freed with the row
                if (row := self._rows.get(r)) is not None:
                    row.stale_units |= units
        return stale

    def requeue(
        self,
        task: str,
        rows: Iterable[int],
        *,
        only_leased: bool = False,
        lease: int | None = None,
    ) -> None:
        """Give leased rows back to ``task`` (its consumer failed); they become ready again.
        ``only_leased`` skips rows no longer leased (a loss invalidated them meanwhile).
        ``lease`` (a :attr:`BatchMeta.lease`) skips rows that lease no longer holds, whoever
        holds them now: a stale call never gives back a newer call's rows."""
        t = self._task(task)
        if lease is not None:
            rows = [r for r in rows if _holds(t, r, lease)]
        elif only_leased:
            rows = [r for r in rows if r in t.leased]
        else:
            rows = list(rows)
        self._unlease(t, rows)

    # ------------------------------------------------------------------ failures
    def mark_unit_lost(self, unit: str) -> dict[str, list[int]]:
        """A storage unit disappeared: every field it held goes back to not ready.

        Returns ``{column: rows}`` lost. Lineage: for a row still needed by some task, the lost
        columns and every column derived from them (transitively, through the tasks that
        consume and produce them) are dropped, and the tasks that produce or consume those
        columns forget the row, so it flows through them again from its surviving inputs.
        Superseded copies on other units are freed with the row (through ``on_release``).

        The unit is remembered: results written there by calls leased before now (a worker
        that replied, then died) are not produced (see :meth:`complete`).
        """
        self._losses += 1
        self._lost_at[unit] = self._losses
        self._lost.add(unit)
        held = self._unit_rows.pop(unit, {})
        lost: dict[str, list[int]] = {}
        dropped: list[tuple[int, _Row, set[str]]] = []
        for rid, cols in held.items():
            row = self._rows.get(rid)
            if row is None:
                continue
            gone = {c for c in cols if (fm := row.fields.get(c)) is not None and fm.unit == unit}
            for c in gone:
                lost.setdefault(c, []).append(rid)
                del row.fields[c]
            self.lost_fields += len(gone)
            if gone:
                dropped.append((rid, row, gone))
        # every field first, then lineage: redoing one row can redo its group's other rows
        for rid, row, gone in dropped:
            self._invalidate(rid, row, gone)
        self._wake_touched()
        return lost

    def unit_back(self, unit: str) -> None:
        """A worker stores under a lost ``unit``'s name again (an attached worker restarted by
        its orchestrator keeps its unit name): :meth:`mark_ready` accepts the name again.
        (:meth:`complete` needs no call: it accepts results there of rows leased after the
        loss, and keeps refusing those of rows leased before it.)"""
        self._lost.discard(unit)

    def invalidate(self, rows: Sequence[int], columns: Sequence[str]) -> None:
        """Throw away ``columns`` of ``rows`` (e.g. responses whose reward failed under the
        "regenerate" policy): they and everything derived from them are recomputed through
        lineage, as if their storage unit had been lost. Superseded copies are freed when the
        row is released."""
        for rid in rows:
            row = self._rows.get(rid)
            if row is None:
                continue
            gone = {c for c in columns if c in row.fields}
            for c in gone:
                fm = row.fields.pop(c)
                self._drop_unit_entry(fm.unit, rid, c)
                row.stale_units.add(fm.unit)
            if gone:
                self._invalidate(rid, row, gone)
        self._wake_touched()

    def _invalidate(
        self, rid: int, row: _Row, gone: set[str], force: frozenset[str] = frozenset()
    ) -> None:
        """``gone`` columns of row ``rid`` were dropped: drop what was derived from them and
        send the row back through the tasks that must recompute what is still needed.

        The tasks that will still run for the row are every task that has not consumed it (a
        row is released only once all have) -- plus ``force`` -- and, transitively, the
        producers of the dropped columns those need. A final consumer (it produces nothing)
        that consumed the row is done with it for good (the trainer's update happened): it is
        never reset, so it never gets the row twice; with PPO's two trainers the critic still
        gets the recomputed row after the actor's update, the actor not again."""
        derived = self._downstream(frozenset(gone))
        run = {t.name for t in self._tasks.values() if rid not in t.consumed} | force
        need: set[str] = set()
        frontier = list(run)
        while frontier:
            for col in self._tasks[frontier.pop()].requires:
                if col in derived and col not in need:
                    need.add(col)
                    p = self._producer.get(col)
                    if p is not None and p not in run:
                        run.add(p)
                        frontier.append(p)
        if not need and not force:
            return  # every task still to run has what it needs: nothing to redo
        for c in derived - gone:
            fm = row.fields.pop(c, None)
            if fm is not None:
                self._drop_unit_entry(fm.unit, rid, c)
                row.stale_units.add(fm.unit)
        for name in sorted(run):
            t = self._tasks[name]
            if rid in t.consumed:  # a producer whose output is needed again
                t.consumed.discard(rid)
                row.acked_by -= 1
            elif rid in t.leased:
                if not t.produces or t.required.isdisjoint(derived):
                    # A final consumer (the trainer) already pulled this row: its use of the
                    # old data is whole. It acks (trained once) or requeues (then the row waits
                    # for the recomputed fields like any other). A producer whose inputs are
                    # intact finishes its call as usual.
                    continue
                del t.leased[rid]  # its result would derive from the dropped data
            else:
                continue
            self._maybe_ready(t, rid, row)
            if t.groups and t.produces:
                self._reset_siblings(t, rid)

    def _reset_siblings(self, t: _Task, rid: int) -> None:
        """A group producer must redo row ``rid``: it runs on whole groups, so it redoes the
        resident rest of the group too (otherwise the group never becomes ready for it)."""
        for sid in self._groups[self._rows[rid].group].rows:
            sib = self._rows.get(sid)
            if sib is None or sid == rid:
                continue
            if sid in t.leased:
                del t.leased[sid]
                self._maybe_ready(t, sid, sib)
            elif sid in t.consumed:
                gone = {c for c in t.produces if c in sib.fields}
                for c in gone:
                    fm = sib.fields.pop(c)
                    self._drop_unit_entry(fm.unit, sid, c)
                    sib.stale_units.add(fm.unit)
                self._invalidate(sid, sib, gone, force=frozenset({t.name}))

    def _downstream(self, cols: frozenset[str]) -> set[str]:
        """``cols`` plus every column produced by a task that needs one of them, transitively."""
        out = set(cols)
        frontier = list(cols)
        while frontier:
            col = frontier.pop()
            for t in self._by_column.get(col, ()):
                for p in t.produces:
                    if p not in out:
                        out.add(p)
                        frontier.append(p)
        return out

    # ------------------------------------------------------------------ inspection
    def row_fields(self, rid: int) -> dict[str, FieldMeta]:
        return dict(self._rows[rid].fields)

    def row_meta(self, rid: int) -> dict[str, Any]:
        return self._rows[rid].meta

    def group_rows(self, gid: int) -> list[int]:
        return list(self._groups[gid].rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, rid: object) -> bool:
        """Whether row ``rid`` is resident (registered and not yet released)."""
        return rid in self._rows

    def resident_units(self) -> dict[str, int]:
        return {u: len(r) for u, r in self._unit_rows.items()}

    # ------------------------------------------------------------------ snapshot
    def snapshot(self, done: Iterable[int] = ()) -> dict[str, Any]:
        """The whole state as JSON-able data. Leases are saved as not consumed (a restored run's
        consumers are new), so leased rows are handed out again after :meth:`restore`.

        ``done``: rows to save as released although they are not yet -- a step's checkpoint
        is taken just before its rows are acknowledged, and a restored run must not generate
        them again."""
        gone = {int(r) for r in done if int(r) in self._rows}
        return {
            "next_row": self._next_row,
            "next_group": self._next_group,
            "released_rows": self.released_rows + len(gone),
            "tasks": [
                {
                    "name": t.name,
                    "requires": list(t.requires),
                    "produces": list(t.produces),
                    "groups": t.groups,
                    "policy": "fifo",  # the only order; kept so that older code restores this
                    "partition": t.partition,
                    "consumed": sorted(t.consumed - gone),
                }
                for t in self._tasks.values()
            ],
            "groups": {
                str(g): grp.rows
                for g, grp in self._groups.items()
                if any(r in self._rows and r not in gone for r in grp.rows)
            },
            "rows": {
                str(rid): {
                    "group": row.group,
                    "meta": row.meta,
                    "fields": {
                        c: [f.unit, list(f.shape), f.dtype, f.version]
                        for c, f in row.fields.items()
                    },
                }
                for rid, row in self._rows.items()
                if rid not in gone
            },
        }

    @classmethod
    def restore(
        cls,
        state: Mapping[str, Any],
        on_release: Callable[[dict[str, list[int]]], None] | None = None,
    ) -> SampleIndex:
        idx = cls(on_release)
        for t in state["tasks"]:
            idx.register_task(
                t["name"],
                t["requires"],
                t["produces"],
                groups=t["groups"],
                partition=t.get("partition"),  # an old snapshot's "policy" is ignored: fifo
            )
        idx._next_row = int(state["next_row"])
        idx._next_group = int(state["next_group"])
        idx.released_rows = int(state["released_rows"])
        for g, rows in state["groups"].items():
            idx._groups[int(g)] = _Group([int(r) for r in rows])
        for rid_s, r in state["rows"].items():
            idx._rows[int(rid_s)] = _Row(int(r["group"]), dict(r["meta"]))
        consumed = {t["name"]: set(t["consumed"]) for t in state["tasks"]}
        for t in idx._tasks.values():
            t.consumed = {r for r in consumed[t.name] if r in idx._rows}
            for rid in t.consumed:
                idx._rows[rid].acked_by += 1
        for rid_s, r in state["rows"].items():
            for col, (unit, shape, dtype, ver) in r["fields"].items():
                idx._mark_ready([int(rid_s)], col, unit, [tuple(shape)], dtype, ver)
        return idx

    # ------------------------------------------------------------------ internals
    def _task(self, name: str) -> _Task:
        try:
            return self._tasks[name]
        except KeyError:
            raise KeyError(f"unknown task {name!r}; registered: {sorted(self._tasks)}") from None

    def _row_ready_for(self, t: _Task, rid: int, row: _Row) -> bool:
        if rid in t.consumed or rid in t.leased:
            return False
        return row.fields.keys() >= t.required  # a C-level subset test

    def _maybe_ready(self, t: _Task, rid: int, row: _Row) -> None:
        if not self._row_ready_for(t, rid, row):
            return
        if not t.groups:
            self._enqueue(t, rid)
            return
        gid = row.group
        # Count afresh over the group (groups are small): robust to losses and requeues. A
        # released row (every task consumed it) no longer belongs to the group's batches.
        if all(self._row_ready_for(t, r, m) for r, m in self._resident(gid)):
            self._enqueue(t, gid)

    def _resident(self, gid: int) -> list[tuple[int, _Row]]:
        """The group's rows not yet released, with their records."""
        grp = self._groups.get(gid)
        if grp is None:
            return []
        return [(r, m) for r in grp.rows if (m := self._rows.get(r)) is not None]

    def _queue(self, t: _Task, key: Any) -> _Queue:
        if key is not None and t.partition is None:
            raise ValueError(f"task {t.name!r} is not partitioned; don't name a partition")
        q = t.queues.get(key)
        if q is None:
            q = t.queues[key] = _Queue()
        return q

    def _key(self, t: _Task, item: int) -> Any:
        if t.partition is None:
            return None
        row = self._resident(item)[0][1] if t.groups else self._rows[item]
        return row.meta.get(t.partition)

    def _enqueue(self, t: _Task, item: int) -> None:
        q = self._queue(t, self._key(t, item))
        if item in q.queued:
            return
        q.queued.add(item)
        q.ready.append(item)
        if q.waiters:
            self._touched.append((t, q))

    def _valid(self, t: _Task, item: int) -> bool:
        if t.groups:
            members = self._resident(item)
            return bool(members) and all(self._row_ready_for(t, r, m) for r, m in members)
        row = self._rows.get(item)
        return row is not None and self._row_ready_for(t, item, row)

    def _pop(self, t: _Task, q: _Queue) -> int | None:
        while q.ready:
            item = q.ready.popleft()
            q.queued.discard(item)
            if self._valid(t, item):
                return item
        return None

    def _take(self, t: _Task, q: _Queue, n: int, at_least: int) -> list[int] | None:
        """Pop up to ``n`` valid items, at least ``at_least``; else put back what was popped
        and return None."""
        if len(q.queued) < at_least:
            return None
        items: list[int] = []
        while len(items) < n:
            item = self._pop(t, q)
            if item is None:
                break
            items.append(item)
        if len(items) < at_least:
            for it in reversed(items):  # not enough valid ones: put back, in order
                _push_front(q, it)
            return None
        return items

    def _try_take(self, t: _Task, q: _Queue, n: int, at_least: int) -> BatchMeta | None:
        if q.waiters:  # first come, first served: don't overtake a waiting consumer
            return None
        items = self._take(t, q, n, at_least)
        return None if items is None else self._lease(t, items)

    def _lease(self, t: _Task, items: list[int]) -> BatchMeta:
        """Lease ``items`` to ``t`` under a fresh lease id; their batch's metadata."""
        rows = [r for g in items for r, _ in self._resident(g)] if t.groups else items
        lease = _Lease(next(self._lease_ids), self._losses)
        t.leased.update(dict.fromkeys(rows, lease))
        return self._meta(t, rows, lease.id)

    def _unlease(self, t: _Task, rows: list[int]) -> None:
        for rid in rows:
            if rid not in t.leased:
                raise ValueError(f"row {rid} is not leased to task {t.name!r}")
        for rid in rows:
            del t.leased[rid]
        seen: set[int] = set()
        # Requeued rows go to the front (oldest first), keeping their order.
        for rid in reversed(rows):
            row = self._rows[rid]
            item = row.group if t.groups else rid
            if item in seen or not self._valid(t, item):
                continue
            seen.add(item)
            q = self._queue(t, self._key(t, item))
            if item not in q.queued:
                _push_front(q, item)
                self._touched.append((t, q))
        self._wake_touched()

    def _wake_touched(self) -> None:
        while self._touched:
            t, q = self._touched.pop()
            self._wake(t, q)

    def _wake(self, t: _Task, q: _Queue) -> None:
        while q.waiters:
            w = q.waiters[0]
            if w.future.done():  # cancelled
                q.waiters.popleft()
                continue
            items = self._take(t, q, w.n, w.at_least)
            if items is None:
                return
            q.waiters.popleft()
            w.future.set_result(self._lease(t, items))

    def _meta(self, t: _Task, rows: list[int], lease: int) -> BatchMeta:
        row_objs = list(map(self._rows.__getitem__, rows))
        per_row = [ro.fields for ro in row_objs]
        fields = {c: [f[c] for f in per_row] for c in t.requires}
        return BatchMeta(
            t.name,
            rows,
            [ro.group for ro in row_objs],
            fields,
            [ro.meta for ro in row_objs],
            lease,
        )

    def _release(self, rid: int, row: _Row, out: dict[str, list[int]]) -> None:
        for col, fm in row.fields.items():
            self._drop_unit_entry(fm.unit, rid, col)
        for unit in {fm.unit for fm in row.fields.values()} | row.stale_units:
            out.setdefault(unit, []).append(rid)
        del self._rows[rid]
        for t in self._tasks.values():
            t.consumed.discard(rid)
        grp = self._groups.get(row.group)
        if grp is not None and all(r not in self._rows for r in grp.rows):
            del self._groups[row.group]
        self.released_rows += 1

    def _drop_unit_entry(self, unit: str, rid: int, col: str) -> None:
        rows = self._unit_rows.get(unit)
        if rows is None:
            return
        cols = rows.get(rid)
        if cols is None:
            return
        cols.discard(col)
        if not cols:
            del rows[rid]


def _per_row_shapes(
    shapes: Sequence[Sequence[int]] | Sequence[int] | None, n: int
) -> list[tuple[int, ...]]:
    if shapes is None:
        return [()] * n
    if len(shapes) == 0 or isinstance(shapes[0], int):
        one = tuple(int(s) for s in shapes)  # type: ignore[arg-type]
        return [one] * n
    if len(shapes) != n:
        raise ValueError(f"got {len(shapes)} shapes for {n} rows")
    return [tuple(s) for s in shapes]  # type: ignore[arg-type]


def _holds(t: _Task, rid: int, lease: int) -> bool:
    """Whether lease ``lease`` of task ``t`` still holds row ``rid``."""
    held = t.leased.get(rid)
    return held is not None and held.id == lease


def _push_front(q: _Queue, item: int) -> None:
    q.queued.add(item)
    q.ready.appendleft(item)
