"""Pulls a batch's tensors straight from the storage units that hold them, concurrently.

Given a :class:`~asyncflow.transfer.index.BatchMeta` (what the controller hands out), the client
sends one request per storage unit, in parallel, and assembles each column in batch order:
either stacked (every row the same shape), padded with per-row lengths, or packed (values plus
cumulative offsets) for ragged token sequences. The controller is never on this path.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
import torch

from asyncflow.transfer.framing import decode, encode
from asyncflow.transfer.index import BatchMeta
from asyncflow.transfer.storage import ColumnData

READ_BUFSIZE = 4 << 20


class TransferError(RuntimeError):
    """A storage unit could not serve a request (unreachable, refused, or bad answer)."""

    def __init__(self, unit: str, message: str, status: int | None = None) -> None:
        super().__init__(f"storage unit {unit!r}: {message}")
        self.unit = unit
        self.status = status


@dataclass(frozen=True, slots=True)
class Column:
    """One column of an assembled batch, rows in batch order."""

    data: ColumnData

    @property
    def ragged(self) -> bool:
        return self.data.lengths is not None

    def stacked(self) -> torch.Tensor:
        """(B, *shape) for a column whose rows all have one shape."""
        if self.data.lengths is not None:
            raise ValueError("ragged column: use padded() or packed()")
        return self.data.values

    def lengths(self) -> torch.Tensor:
        if self.data.lengths is not None:
            return self.data.lengths
        n = self.data.values.shape[0]
        width = self.data.values.shape[1] if self.data.values.dim() > 1 else 1
        return torch.full((n,), width, dtype=torch.int64)

    def padded(self, pad_value: float = 0, width: int | None = None) -> torch.Tensor:
        """(B, L, *rest) right-padded to the longest row (or to ``width``)."""
        d = self.data
        if d.lengths is None:
            return d.values
        lengths = d.lengths
        longest = int(lengths.max()) if len(lengths) else 0
        L = longest if width is None else width
        if longest > L:
            raise ValueError(f"width {L} is shorter than the longest row ({longest})")
        out = d.values.new_full((len(lengths), L, *d.values.shape[1:]), pad_value)
        mask = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
        out[mask] = d.values
        return out

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (N, *rest), cu_seqlens (B + 1,)) for varlen kernels."""
        lengths = self.lengths()
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        values = self.data.values
        if self.data.lengths is None and values.dim() > 1:
            values = values.reshape(-1, *values.shape[2:])
        return values, cu


class TransferClient:
    """HTTP client of the storage units of one run."""

    def __init__(
        self,
        units: Mapping[str, str],
        token: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.units = dict(units)  # unit name -> base URL
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __aenter__(self) -> TransferClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            conn = aiohttp.TCPConnector(limit=64)
            # A large read buffer: the default (64 KiB) pauses the socket every two chunks.
            self._session = aiohttp.ClientSession(
                connector=conn, timeout=self._timeout, read_bufsize=READ_BUFSIZE
            )
        return self._session

    def _url(self, unit: str, path: str) -> str:
        try:
            return self.units[unit].rstrip("/") + path
        except KeyError:
            raise TransferError(unit, "no URL known for this unit") from None

    async def fetch(
        self, meta: BatchMeta, columns: Sequence[str] | None = None
    ) -> dict[str, Column]:
        """Pull ``columns`` (default: every column in ``meta``) of the batch's rows."""
        cols = list(columns) if columns is not None else list(meta.fields)
        plan: dict[str, dict[str, list[int]]] = {}  # unit -> column -> rows (batch order)
        where: dict[str, list[tuple[str, int]]] = {}  # column -> (unit, idx in that unit's rows)
        for col in cols:
            fms = meta.fields[col]
            slots = []
            for rid, fm in zip(meta.rows, fms):
                rows = plan.setdefault(fm.unit, {}).setdefault(col, [])
                slots.append((fm.unit, len(rows)))
                rows.append(rid)
            where[col] = slots
        units = list(plan)
        results = await asyncio.gather(*(self.get(u, plan[u]) for u in units))
        got = dict(zip(units, results))
        return {col: Column(_assemble(col, where[col], got)) for col in cols}

    async def get(self, unit: str, columns: Mapping[str, Sequence[int]]) -> dict[str, ColumnData]:
        """One request to one unit: ``{column: rows}`` -> ``{column: ColumnData}``."""
        body = {"columns": {c: list(r) for c, r in columns.items()}}
        buf = await self._request(unit, "/v1/storage/get", json=body)
        tensors, _ = decode(buf)
        out: dict[str, ColumnData] = {}
        for c in columns:
            if c in tensors:
                out[c] = ColumnData(tensors[c])
            else:
                out[c] = ColumnData(tensors[f"{c}.values"], tensors[f"{c}.lengths"])
        return out

    async def put(
        self, unit: str, rows: Sequence[int], columns: Mapping[str, ColumnData | torch.Tensor]
    ) -> dict[str, list[list[int]]]:
        """Store columns of ``rows`` at a remote unit; returns each row's shape per column."""
        tensors: dict[str, torch.Tensor] = {}
        for c, d in columns.items():
            data = d if isinstance(d, ColumnData) else ColumnData(d)
            if data.lengths is None:
                tensors[c] = data.values
            else:
                tensors[f"{c}.values"] = data.values
                tensors[f"{c}.lengths"] = data.lengths
        bufs = encode(tensors, {"rows": list(rows)})
        raw = await self._request(unit, "/v1/storage/put", data=_Payload(bufs))
        shapes: dict[str, list[list[int]]] = json.loads(bytes(raw))["shapes"]
        return shapes

    async def free(self, unit: str, rows: Sequence[int]) -> int:
        raw = await self._request(unit, "/v1/storage/free", json={"rows": list(rows)})
        return int(json.loads(bytes(raw))["freed"])

    async def _request(self, unit: str, path: str, **kw: object) -> bytearray:
        url = self._url(unit, path)
        try:
            async with self._http().post(url, headers=self._headers, **kw) as resp:  # type: ignore[arg-type]
                if resp.status != 200:
                    text = (await resp.read())[:500].decode(errors="replace")
                    raise TransferError(unit, f"HTTP {resp.status}: {text}", resp.status)
                return await _read_into(resp)
        except aiohttp.ClientError as e:
            raise TransferError(unit, f"{type(e).__name__}: {e}") from e
        except TimeoutError as e:
            raise TransferError(unit, "request timed out") from e


async def _read_into(resp: aiohttp.ClientResponse) -> bytearray:
    size = resp.content_length
    if size is None:
        return bytearray(await resp.read())
    buf = bytearray(size)
    view = memoryview(buf)
    pos = 0
    async for chunk in resp.content.iter_any():
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    if pos != size:
        raise aiohttp.ClientPayloadError(f"got {pos} of {size} bytes")
    return buf


def _assemble(
    col: str, slots: list[tuple[str, int]], got: Mapping[str, Mapping[str, ColumnData]]
) -> ColumnData:
    parts = {u: got[u][col] for u in {u for u, _ in slots}}
    if len(parts) == 1:  # one unit, rows already in batch order: no copy
        return next(iter(parts.values()))
    if all(p.lengths is None for p in parts.values()):
        shapes = {tuple(p.values.shape[1:]) for p in parts.values()}
        if len(shapes) == 1:
            first = next(iter(parts.values())).values
            out = first.new_empty((len(slots), *first.shape[1:]))
            positions: dict[str, list[int]] = {}
            for i, (u, _) in enumerate(slots):  # each unit's rows arrive in batch order
                positions.setdefault(u, []).append(i)
            for u, pos in positions.items():
                _place_rows(out, pos, parts[u].values)
            return ColumnData(out)
    rows_of = {u: p.split() for u, p in parts.items()}
    ts = [rows_of[u][j] for u, j in slots]
    lengths = torch.tensor([t.shape[0] if t.dim() else 1 for t in ts], dtype=torch.int64)
    return ColumnData(torch.cat([t.reshape(-1, *t.shape[1:]) for t in ts]), lengths)


def _place_rows(out: torch.Tensor, pos: list[int], values: torch.Tensor) -> None:
    """``out[pos] = values`` for rows, as plain (strided) copies where the positions allow.

    Advanced-index assignment is 4x slower than a strided copy of the same bytes; a unit's rows
    usually sit at evenly spaced positions (rows dealt round-robin) or in a few runs."""
    if len(pos) == 1 or all(b - a == pos[1] - pos[0] > 0 for a, b in itertools.pairwise(pos)):
        step = pos[1] - pos[0] if len(pos) > 1 else 1
        out[pos[0] : pos[-1] + 1 : step].copy_(values)
        return
    runs: list[tuple[int, int]] = []  # [start, end) in pos of consecutive positions
    start = 0
    for i in range(1, len(pos) + 1):
        if i == len(pos) or pos[i] != pos[i - 1] + 1:
            runs.append((start, i))
            start = i
    if len(runs) <= 16:
        for a, b in runs:
            out[pos[a] : pos[a] + (b - a)].copy_(values[a:b])
        return
    out.index_copy_(0, torch.tensor(pos, dtype=torch.int64), values)


class _Payload(aiohttp.payload.Payload):
    """Streams a frame's buffers without joining them into one bytes object."""

    def __init__(self, bufs: list[memoryview | bytes]) -> None:
        super().__init__(bufs, content_type="application/octet-stream")
        self._bufs = bufs
        self._size = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in bufs)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        for b in self._bufs:
            await writer.write(b)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return "".join(bytes(b).decode(encoding, errors) for b in self._bufs)
