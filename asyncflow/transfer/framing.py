"""Tensor framing on the wire: the safetensors layout, written and read without copies.

A frame is an 8-byte little-endian header length, a JSON header (``{name: {dtype, shape,
data_offsets}}`` plus a ``__metadata__`` dict of strings) and the raw bytes of each tensor. It
is exactly the safetensors format, so ``safetensors.torch.load(frame)`` reads it too, and
nothing is ever unpickled. We write it ourselves because ``safetensors.torch.save`` copies every
tensor into one new buffer; here the header and the tensors' own memory are handed to the socket
as separate buffers, and the reader maps tensors onto the received buffer in place.

Ragged columns (token sequences of different lengths) travel as ``{col}.values`` (all rows
concatenated along dim 0, no padding) and ``{col}.lengths`` (int64, one per row).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import torch

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODES: dict[str, torch.dtype] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 64 * 1024 * 1024


class FrameError(ValueError):
    """A frame that is not well-formed safetensors (bad header, offsets, dtype or shape)."""


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype names used in the index metadata (``float32``, ``int64``...)."""
    return str(dtype).removeprefix("torch.")


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def encode(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> list[memoryview | bytes]:
    """Frame ``tensors``; returns buffers to write in order (header first, then tensor bytes)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: json.dumps(v) for k, v in metadata.items()}
    bufs: list[memoryview | bytes] = []
    offset = 0
    # Widest dtypes first: every tensor then starts aligned to its element size, with no holes
    # in the data section (safetensors forbids holes).
    order = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
    for name, t in order:
        if t.dtype not in DTYPES:
            raise FrameError(f"dtype {t.dtype} of {name!r} cannot be framed")
        raw = _raw(t)
        header[name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        offset += raw.nbytes
        bufs.append(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # safetensors aligns the data section to 8 bytes
    return [struct.pack("<Q", len(hjson)) + hjson, *bufs]


def frame_size(bufs: list[memoryview | bytes]) -> int:
    return sum(len(b) if isinstance(b, bytes) else b.nbytes for b in bufs)


def encode_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> bytes:
    """The frame as one ``bytes`` object (copies; for small frames and tests)."""
    return b"".join(bytes(b) for b in encode(tensors, metadata))


def decode(buf: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a frame. Tensors view ``buf`` without copying when it is writable (a bytearray);
    otherwise they are copied once. Raises :class:`FrameError` on anything malformed."""
    mv = memoryview(buf).cast("B")
    if mv.nbytes < 8:
        raise FrameError("frame shorter than its 8-byte header length")
    (hlen,) = struct.unpack_from("<Q", mv, 0)
    if hlen > MAX_HEADER or 8 + hlen > mv.nbytes:
        raise FrameError(f"header length {hlen} does not fit a frame of {mv.nbytes} bytes")
    try:
        header = json.loads(bytes(mv[8 : 8 + hlen]))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # incl. JSONDecodeError
        raise FrameError(f"header is not JSON: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise FrameError("header is not a JSON object")
    meta_raw = header.pop("__metadata__", {}) or {}
    try:
        metadata = {k: json.loads(v) for k, v in meta_raw.items()}
    except (AttributeError, TypeError, ValueError, RecursionError) as e:
        raise FrameError(f"bad __metadata__: {e}") from None
    data = mv[8 + hlen :]
    writable = not mv.readonly
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        out[name] = _tensor(name, info, data, writable)
    return out, metadata


def _tensor(name: str, info: Any, data: memoryview, writable: bool) -> torch.Tensor:
    try:
        dtype = CODES[info["dtype"]]
        raw_shape, raw_offsets = info["shape"], info["data_offsets"]
        if not isinstance(raw_shape, list) or not isinstance(raw_offsets, list):
            raise TypeError("shape and data_offsets must be lists")
        if not all(type(x) is int for x in [*raw_shape, *raw_offsets]):
            raise TypeError("shape and data_offsets must hold integers")
        shape = list(raw_shape)
        start, end = raw_offsets
    except (KeyError, TypeError, ValueError) as e:
        raise FrameError(f"bad header entry for {name!r}: {e!r}") from None
    if any(s < 0 for s in shape) or not 0 <= start <= end <= data.nbytes:
        raise FrameError(f"bad shape/offsets for {name!r}: {shape} {start}:{end}")
    numel = 1
    for s in shape:
        numel *= s
    item = torch.empty((), dtype=dtype).element_size()
    if numel * item != end - start:
        raise FrameError(
            f"{name!r}: shape {shape} of {info['dtype']} needs {numel * item} "
            f"bytes, offsets give {end - start}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    chunk = data[start:end]
    raw = torch.frombuffer(chunk if writable else bytearray(chunk), dtype=torch.uint8)
    if dtype == torch.bool:
        return raw.view(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)
