"""Turning pulled columns (ragged prompt and response tokens, per-token or per-row extras) into
the padded :class:`~asyncflow.engines.protocols.TrainBatch` the training engines take, and
per-token results back into ragged response-aligned rows.

Alignment: the sequence is ``prompt + response``, right-padded to the batch's longest. Every
per-token tensor is (B, T) with column ``t`` belonging to token ``x_t``; response token ``j`` of
row ``i`` sits at column ``P_i + j`` (``P_i`` = that row's prompt length), where ``loss_mask`` is 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from asyncflow.engines.protocols import TrainBatch
from asyncflow.transfer.client import Column


def build_train_batch(
    prompt: Column,
    response: Column,
    per_token: Mapping[str, Column] | None = None,
    per_row: Mapping[str, Column] | None = None,
    pad_id: int = 0,
) -> TrainBatch:
    """Concatenate prompt and response per row; place response-aligned extras.

    ``per_token`` columns are ragged like ``response`` (one value per response token);
    ``per_row`` columns are one scalar per row, broadcast over that row's response tokens.
    """
    p_rows = prompt.data.split()
    r_rows = response.data.split()
    B = len(p_rows)
    p_len = torch.tensor([len(p) for p in p_rows], dtype=torch.int64)  # (B,)
    r_len = torch.tensor([len(r) for r in r_rows], dtype=torch.int64)  # (B,)
    T = int((p_len + r_len).max()) if B else 0
    input_ids = torch.full((B, T), pad_id, dtype=torch.int64)
    attention = torch.zeros(B, T, dtype=torch.int64)
    loss_mask = torch.zeros(B, T, dtype=torch.float32)
    for i, (p, r) in enumerate(zip(p_rows, r_rows)):
        n_p, n_r = len(p), len(r)
        input_ids[i, :n_p] = p
        input_ids[i, n_p : n_p + n_r] = r
        attention[i, : n_p + n_r] = 1
        loss_mask[i, n_p : n_p + n_r] = 1.0
    resp_pos = loss_mask.bool()  # (B, T): where response tokens sit, row-major = ragged order
    tensors: dict[str, torch.Tensor] = {}
    for name, col in (per_token or {}).items():
        out = torch.zeros(B, T, dtype=torch.float32)
        vals = col.data.values.float().reshape(-1)  # ragged, or stacked when lengths agree
        if vals.numel() != int(r_len.sum()):
            raise ValueError(f"{name}: {vals.numel()} values for {int(r_len.sum())} tokens")
        out[resp_pos] = vals
        tensors[name] = out
    for name, col in (per_row or {}).items():
        vals = col.stacked().float().reshape(B, 1)  # (B, 1)
        tensors[name] = vals * loss_mask
    return TrainBatch(input_ids, attention, loss_mask, tensors)


def response_values(batch: TrainBatch, values: torch.Tensor) -> list[torch.Tensor]:
    """The response-aligned entries of a (B, T) tensor, one 1-D tensor per row."""
    mask = batch.loss_mask.bool()
    return [values[i][mask[i]].float().contiguous() for i in range(values.shape[0])]
