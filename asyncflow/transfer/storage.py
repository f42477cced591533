"""A storage unit: the tensors of the columns one worker produced, for its rows.

It lives inside a worker process. The producer puts tensors in locally (no copy: rows are views
of the batch tensor the engine produced); other workers pull ``rows x columns`` over HTTP
(see :mod:`asyncflow.transfer.service`); the controller tells it when rows may be freed.

Getting rows that were put together, in order, costs no copy: their views are adjacent in one
buffer, so the unit hands out that buffer's slice. Otherwise rows are gathered into one buffer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


class MissingRows(KeyError):
    """Rows (or columns) asked for that this unit does not hold."""

    def __init__(self, column: str, rows: list[int]) -> None:
        super().__init__(f"column {column!r}: {len(rows)} rows not held here, e.g. {rows[:8]}")
        self.column = column
        self.rows = rows


@dataclass(frozen=True, slots=True)
class ColumnData:
    """Rows of one column: ``values`` is (n, *shape) when every row has the same shape; for
    ragged rows it is the rows concatenated along dim 0 and ``lengths`` holds each row's length.
    """

    values: torch.Tensor
    lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.lengths) if self.lengths is not None else int(self.values.shape[0])

    def row(self, i: int) -> torch.Tensor:
        if self.lengths is None:
            return self.values[i]
        start = int(self.lengths[:i].sum())
        return self.values[start : start + int(self.lengths[i])]

    def split(self) -> list[torch.Tensor]:
        if self.lengths is None:
            return list(self.values.unbind(0))
        return list(torch.split(self.values, self.lengths.tolist(), dim=0))


@dataclass(frozen=True, slots=True)
class _Block:
    """The rows of one put, as they arrived: getting a run of them back is a slice."""

    data: ColumnData
    offsets: list[int] | None  # ragged: where each row starts along dim 0 (n + 1 entries)

    def slice(self, first: int, n: int) -> ColumnData:
        if self.offsets is None:
            return ColumnData(self.data.values[first : first + n])
        lengths = self.data.lengths
        assert lengths is not None
        start, end = self.offsets[first], self.offsets[first + n]
        return ColumnData(self.data.values[start:end], lengths[first : first + n].long())


class StorageUnit:
    """Holds ``column -> row -> tensor`` for one worker."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cols: dict[str, dict[int, torch.Tensor]] = {}
        #: column -> row -> (the put it came with, its ordinal there): lets a get of rows that
        #: were put together, in order, skip the per-row checks (a few dict lookups per row)
        self._where: dict[str, dict[int, tuple[_Block, int]]] = {}
        self.bytes_held = 0

    def put(
        self,
        column: str,
        rows: Sequence[int],
        data: ColumnData | torch.Tensor | Sequence[torch.Tensor],
    ) -> list[tuple[int, ...]]:
        """Store ``column`` for ``rows``; returns each row's shape (for the index)."""
        if isinstance(data, torch.Tensor):
            data = ColumnData(data)
        per_row = data.split() if isinstance(data, ColumnData) else list(data)
        if len(per_row) != len(rows):
            raise ValueError(f"{column!r}: {len(per_row)} tensors for {len(rows)} rows")
        block: _Block | None = None
        if isinstance(data, ColumnData):
            detached = ColumnData(
                data.values.detach(), None if data.lengths is None else data.lengths.detach()
            )
            offsets = None
            if data.lengths is not None:
                offsets = [0, *torch.cumsum(data.lengths, 0).tolist()]
            block = _Block(detached, offsets)
        col = self._cols.setdefault(column, {})
        where = self._where.setdefault(column, {})
        for i, (rid, t) in enumerate(zip(rows, per_row)):
            old = col.get(rid)
            if old is not None:
                self.bytes_held -= old.nbytes
            col[rid] = t.detach()
            self.bytes_held += t.nbytes
            if block is not None:
                where[rid] = (block, i)
            else:
                where.pop(rid, None)
        return [tuple(t.shape) for t in per_row]

    def get(self, column: str, rows: Sequence[int]) -> ColumnData:
        run = self._same_put(column, rows) if rows else None
        if run is not None:
            return run
        col = self._cols.get(column, {})
        try:
            ts = [col[r] for r in rows]
        except KeyError:
            raise MissingRows(column, [r for r in rows if r not in col]) from None
        if not ts:
            return ColumnData(torch.empty(0))
        shape0 = ts[0].shape
        if all(t.shape == shape0 for t in ts):
            block = _adjacent(ts)
            if block is not None:
                return ColumnData(block.view(len(ts), *shape0))
            return ColumnData(torch.stack(ts))
        if any(t.dim() == 0 or t.shape[1:] != shape0[1:] for t in ts):
            raise ValueError(f"{column!r}: rows differ in more than their first dimension")
        lengths = torch.tensor([t.shape[0] for t in ts], dtype=torch.int64)
        block = _adjacent(ts)
        values = block.view(-1, *shape0[1:]) if block is not None else torch.cat(ts)
        return ColumnData(values, lengths)

    def _same_put(self, column: str, rows: Sequence[int]) -> ColumnData | None:
        """The rows as one slice when they are a run of one put, in order; else None."""
        where = self._where.get(column)
        if not where:
            return None
        try:
            locs = [where[r] for r in rows]
        except KeyError:
            return None
        block, first = locs[0]
        if all(b is block for b, _ in locs) and [i for _, i in locs] == list(
            range(first, first + len(locs))
        ):
            return block.slice(first, len(locs))
        return None

    def free(self, rows: Sequence[int], columns: Sequence[str] | None = None) -> int:
        """Drop rows (of ``columns``, default all); returns how many (row, column) were freed."""
        n = 0
        for name in columns if columns is not None else list(self._cols):
            col = self._cols.get(name)
            if col is None:
                continue
            where = self._where.get(name, {})
            for r in rows:
                where.pop(r, None)
                t = col.pop(r, None)
                if t is not None:
                    self.bytes_held -= t.nbytes
                    n += 1
        return n

    def columns(self) -> dict[str, int]:
        return {c: len(rows) for c, rows in self._cols.items()}

    def has(self, column: str, rows: Sequence[int]) -> bool:
        col = self._cols.get(column, {})
        return all(r in col for r in rows)

    def stats(self) -> Mapping[str, object]:
        return {"name": self.name, "bytes": self.bytes_held, "columns": self.columns()}


def _adjacent(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """If the tensors lie back to back in one storage, a flat view over all of them.

    Only integer pointer checks per row (this runs on every get): the first and the last row
    must share a storage, and every row must start where the previous one ended; storages never
    overlap, so everything in between lies in that same storage."""
    first, last = ts[0], ts[-1]
    storage = first.untyped_storage()
    if last.untyped_storage().data_ptr() != storage.data_ptr():
        return None
    ptr = first.data_ptr()
    for t in ts:
        if t.data_ptr() != ptr or not t.is_contiguous():
            return None
        ptr += t.nbytes
    total = sum(t.numel() for t in ts)
    return first.new_empty(0).set_(storage, first.storage_offset(), (total,), (1,))
