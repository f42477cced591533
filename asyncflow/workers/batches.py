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


def rows_with_signal(batch: TrainBatch, column: str = "advantages") -> torch.Tensor:
    """(B,) bool: rows with a non-zero ``column`` value on at least one loss token.

    Under a loss with no KL penalty and no entropy bonus, a row whose advantages are all zero
    contributes exactly zero to the loss and to every gradient (the clipped surrogate is
    ``-A * r``), so its forward/backward can be skipped without changing the update, provided
    the loss is normalised by fixed global counts (as streaming steps are). A GRPO group whose
    samples all got the same reward is such a group.
    """
    values = batch.tensors[column]
    return ((values != 0) & (batch.loss_mask > 0)).any(dim=1)


def select_rows(batch: TrainBatch, keep: torch.Tensor) -> TrainBatch:
    """The rows of ``batch`` where the bool (B,) ``keep`` holds, right-padding trimmed to the
    longest kept row."""
    idx = keep.nonzero().flatten()
    attention = batch.attention_mask.index_select(0, idx)
    T = int(attention.sum(dim=1).max()) if idx.numel() else 0
    return TrainBatch(
        batch.input_ids.index_select(0, idx)[:, :T],
        attention[:, :T],
        batch.loss_mask.index_select(0, idx)[:, :T],
        {k: v.index_select(0, idx)[:, :T] for k, v in batch.tensors.items()},
    )
