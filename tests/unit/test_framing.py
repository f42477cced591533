"""The wire framing: round trips, safetensors compatibility, and malformed frames refused."""

from __future__ import annotations

import struct

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from asyncflow.transfer.framing import FrameError, decode, encode_bytes
from asyncflow.transfer.storage import ColumnData, StorageUnit


def test_round_trip_mixed_dtypes_is_aligned_and_safetensors_compatible() -> None:
    ts = {
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "lp": torch.randn(3, 4),
        "half": torch.randn(5).to(torch.bfloat16),
        "odd": torch.arange(3, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
    }
    frame = encode_bytes(ts, {"rows": [1, 2, 3]})
    out, meta = decode(bytearray(frame))
    assert meta == {"rows": [1, 2, 3]}
    for k, v in ts.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    st_out = safetensors.torch.load(frame)
    for k, v in ts.items():
        assert torch.equal(st_out[k], v), k


def test_decode_from_bytearray_does_not_copy() -> None:
    buf = bytearray(encode_bytes({"x": torch.zeros(4)}))
    out, _ = decode(buf)
    out["x"][0] = 7.0  # a view of buf
    out2, _ = decode(buf)
    assert out2["x"][0] == 7.0


@pytest.mark.parametrize(
    "frame, message",
    [
        (b"", "shorter"),
        (struct.pack("<Q", 10**9) + b"{}", "does not fit"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (
            struct.pack("<Q", 48) + b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'[:48],
            "not JSON",
        ),
    ],
)
def test_malformed_frames_raise_frame_error(frame: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode(frame)


def test_offsets_and_shapes_are_checked() -> None:
    hdr = b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}'
    with pytest.raises(FrameError, match="needs 16 bytes"):
        decode(struct.pack("<Q", len(hdr)) + hdr + bytes(12))
    hdr = b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,160]}}'
    with pytest.raises(FrameError, match="offsets"):
        decode(struct.pack("<Q", len(hdr)) + hdr + bytes(16))
    hdr = b'{"x":{"dtype":"PICKLE","shape":[1],"data_offsets":[0,1]}}'
    with pytest.raises(FrameError, match="bad header entry"):
        decode(struct.pack("<Q", len(hdr)) + hdr + bytes(1))


@given(st.lists(st.integers(0, 20), min_size=1, max_size=16))
def test_storage_ragged_rows_round_trip(lengths: list[int]) -> None:
    unit = StorageUnit("u")
    rows = list(range(100, 100 + len(lengths)))
    ts = [torch.arange(n, dtype=torch.int64) + 1000 * i for i, n in enumerate(lengths)]
    shapes = unit.put("ids", rows, ts)
    assert shapes == [(n,) for n in lengths]
    order = rows[::-1]
    got = unit.get("ids", order)
    parts = got.split()
    for rid, t in zip(order, parts):
        assert torch.equal(t, ts[rid - 100])


def test_storage_put_batch_then_get_same_rows_is_zero_copy() -> None:
    unit = StorageUnit("u")
    block = torch.arange(40, dtype=torch.int64).reshape(10, 4)
    unit.put("ids", list(range(10)), ColumnData(block))
    got = unit.get("ids", [2, 3, 4])
    assert got.values.data_ptr() == block[2].data_ptr()
    assert torch.equal(got.values, block[2:5])
    got = unit.get("ids", [4, 2])  # not adjacent: gathered
    assert torch.equal(got.values, block[[4, 2]])
    assert unit.free([2, 3]) == 2
    assert not unit.has("ids", [2])


def test_storage_runs_of_one_put_are_slices_and_overwrites_are_seen() -> None:
    unit = StorageUnit("u")
    values = torch.arange(30, dtype=torch.int64)
    lengths = torch.tensor([3, 0, 5, 2, 20], dtype=torch.int32)  # ragged, int32 lengths
    unit.put("ids", [10, 11, 12, 13, 14], ColumnData(values, lengths))
    got = unit.get("ids", [12, 13, 14])
    assert got.values.data_ptr() == values[3].data_ptr()  # a view: no copy
    assert got.lengths is not None and got.lengths.dtype == torch.int64
    assert got.lengths.tolist() == [5, 2, 20] and torch.equal(got.values, values[3:])
    # a row put again on its own: later gets see the new data, runs across it are gathered
    unit.put("ids", [12], [torch.tensor([-1, -2])])
    got = unit.get("ids", [11, 12, 13])
    assert got.lengths is not None and got.lengths.tolist() == [0, 2, 2]
    assert got.values.tolist() == [-1, -2, 8, 9]
    # rows of two puts, each in order: gathered, right values
    unit.put("ids", [20, 21], ColumnData(torch.tensor([7, 8, 9]), torch.tensor([1, 2])))
    got = unit.get("ids", [13, 14, 20, 21])
    assert got.values.tolist() == [8, 9, *range(10, 30), 7, 8, 9]
    # freed rows are gone from the fast path too
    unit.free([13])
    with pytest.raises(KeyError):
        unit.get("ids", [13, 14])


@pytest.mark.parametrize(
    "positions",
    [
        [3],
        list(range(0, 12, 2)),  # round-robin over two units
        list(range(1, 12, 3)),
        [0, 1, 2, 7, 8, 11],  # a few runs
        [11, 4, 0, 7, 2, 9],  # scattered, out of order
        [5, 3, 1],  # evenly spaced but descending
    ],
)
def test_place_rows_matches_index_assignment(positions: list[int]) -> None:
    from asyncflow.transfer.client import _place_rows

    values = torch.arange(len(positions) * 3, dtype=torch.float32).reshape(-1, 3)
    want = torch.full((12, 3), -1.0)
    want[torch.tensor(positions)] = values
    got = torch.full((12, 3), -1.0)
    _place_rows(got, positions, values)
    assert torch.equal(got, want)
