"""Two real storage-unit worker processes on loopback, and a consumer pulling from both."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest
import torch

from asyncflow.controller.pool import WorkerHandle, spawn_worker
from asyncflow.transfer.client import TransferClient
from asyncflow.transfer.framing import encode_bytes
from asyncflow.transfer.index import SampleIndex
from asyncflow.transfer.storage import ColumnData

TOKEN = secrets.token_hex(8)


@pytest.fixture
async def units() -> AsyncIterator[list[WorkerHandle]]:
    hs = await asyncio.gather(*(spawn_worker("storage", f"su{i}", TOKEN) for i in range(2)))
    try:
        yield list(hs)
    finally:
        await asyncio.gather(*(h.stop() for h in hs))
        for h in hs:
            assert h.proc is not None and h.proc.returncode is not None


async def test_batch_spread_over_two_units_is_assembled_in_order(units: list[WorkerHandle]):
    idx = SampleIndex()
    idx.register_task("train", ["ids", "lp", "reward"])
    rows = idx.add_rows([{}] * 8)
    ragged = [torch.arange(3 + i, dtype=torch.int64) for i in range(8)]
    lp = torch.randn(8, 5)
    reward = torch.arange(8, dtype=torch.float32)
    async with TransferClient({h.unit: h.url for h in units}, TOKEN) as client:
        for k, h in enumerate(units):  # rows alternate between the two units
            mine = rows[k::2]
            lens = torch.tensor([len(ragged[r]) for r in mine])
            vals = torch.cat([ragged[r] for r in mine])
            shapes = await client.put(
                h.unit,
                mine,
                {"ids": ColumnData(vals, lens), "lp": lp[k::2], "reward": reward[k::2]},
            )
            idx.mark_ready(mine, "ids", h.unit, shapes=shapes["ids"], dtype="int64")
            idx.mark_ready(mine, "lp", h.unit, shapes=[5])
            idx.mark_ready(mine, "reward", h.unit, shapes=[])
        meta = await idx.get_batch("train", 8)
        assert set(meta.by_unit("ids")) == {units[0].unit, units[1].unit}
        cols = await client.fetch(meta)
    assert torch.equal(cols["lp"].stacked(), lp[meta.rows])
    assert torch.equal(cols["reward"].stacked(), reward[meta.rows])
    padded = cols["ids"].padded(pad_value=-1)
    assert padded.shape == (8, 10)
    for i, r in enumerate(meta.rows):
        n = len(ragged[r])
        assert torch.equal(padded[i, :n], ragged[r]) and (padded[i, n:] == -1).all()
    values, cu = cols["ids"].packed()
    assert cu.tolist()[-1] == sum(len(t) for t in ragged) == values.numel()


async def test_requests_without_token_or_with_bad_ids_are_refused(units: list[WorkerHandle]):
    h = units[0]
    async with TransferClient({h.unit: h.url}, TOKEN) as client:
        await client.put(h.unit, [0, 1], {"x": torch.ones(2, 3)})
    async with aiohttp.ClientSession() as s:

        async def post(path: str, token: str | None = TOKEN, **kw: object) -> tuple[int, str]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with s.post(h.url + path, headers=headers, **kw) as r:  # type: ignore[arg-type]
                return r.status, await r.text()

        assert (await post("/v1/storage/get", None, json={"columns": {"x": [0]}}))[0] == 401
        assert (await post("/v1/storage/get", "wrong", json={"columns": {"x": [0]}}))[0] == 401
        assert (await post("/v1/storage/free", "wrong", json={"rows": [0, 1]}))[0] == 401
        for body in (
            {"columns": {"x": [-1]}},
            {"columns": {"x": ["0"]}},
            {"columns": []},
            {"columns": {"x": [0.5]}},
        ):
            status, text = await post("/v1/storage/get", json=body)
            assert status == 400, (body, text)
        assert (await post("/v1/storage/get", data=b"{not json"))[0] == 400
        assert (await post("/v1/storage/get", json={"columns": {"x": [7]}}))[0] == 404
        assert (await post("/v1/storage/put", data=b"\x00" * 3))[0] == 400
        bad_rows = encode_bytes({"x": torch.ones(2, 3)}, {"rows": [5]})
        assert (await post("/v1/storage/put", data=bad_rows))[0] == 400
        assert (await post("/v1/storage/free", json={"rows": "all"}))[0] == 400
        async with s.get(
            h.url + "/v1/storage/stats", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            stats = await r.json()
    assert stats["columns"] == {"x": 2}  # nothing above changed the unit
    async with TransferClient({h.unit: h.url}, TOKEN) as client:
        got = await client.get(h.unit, {"x": [1, 0]})
        assert torch.equal(got["x"].values, torch.ones(2, 3))
        assert await client.free(h.unit, [0, 1]) == 2
