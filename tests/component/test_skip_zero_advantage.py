"""Skipping rows whose advantages are all zero changes nothing in the update.

A GRPO group whose samples got equal rewards has all-zero advantages; without a KL penalty or an
entropy bonus its tokens add exactly zero to the loss, so the actor drops those rows before the
forward/backward. These tests train one engine on whole micro-batches and another on the pruned
ones (what the actor role sends to its engine) and compare gradients and weights, including a
step where every row is dropped (the optimizer must still step with zero gradients: AdamW's
moments keep moving the weights).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from asyncflow.algorithms import PolicyLossConfig, PolicyObjective
from asyncflow.engines.protocols import LossContext, TrainBatch
from asyncflow.engines.torch_trainer import OptimizerConfig, TorchTrainingEngine, TrainerConfig
from asyncflow.workers.batches import rows_with_signal, select_rows
from asyncflow.workers.trainer import ActorRole

torch.set_num_threads(1)
VOCAB = 32  # the vocabulary of the tiny_qwen2_dir model (conftest.py)


def group_batch(groups: list[tuple[int, list[int], float]], seed: int) -> TrainBatch:
    """``groups``: (prompt length, response lengths, advantage scale); scale 0 makes the group's
    advantages all zero (equal rewards). Rows right-padded with two extra columns."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p_len, r_lens, scale in groups:
        prompt = torch.randint(1, VOCAB, (p_len,), generator=gen)
        for r in r_lens:
            adv = float(torch.randn((), generator=gen)) * scale
            rows.append((prompt, torch.randint(1, VOCAB, (r,), generator=gen), adv))
    T = max(len(p) + len(r) for p, r, _ in rows) + 2
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.int64)
    att = torch.zeros(B, T, dtype=torch.int64)
    loss = torch.zeros(B, T)
    adv_t = torch.zeros(B, T)
    for i, (p, r, a) in enumerate(rows):
        n_p, n = len(p), len(p) + len(r)
        ids[i, :n_p], ids[i, n_p:n] = p, r
        att[i, :n] = 1
        loss[i, n_p:n] = 1.0
        adv_t[i, n_p:n] = a
    behaviour = -torch.rand(B, T, generator=gen) * loss
    return TrainBatch(ids, att, loss, {"advantages": adv_t, "rollout_logprobs": behaviour})


def test_rows_with_signal_and_select_rows() -> None:
    batch = group_batch([(3, [2, 5], 1.0), (4, [6, 1], 0.0), (2, [3], 1.0)], seed=0)
    keep = rows_with_signal(batch)
    assert keep.tolist() == [True, True, False, False, True]
    out = select_rows(batch, keep)
    assert out.input_ids.shape == (3, 8)  # the longest kept row: 3 + 5 tokens, padding trimmed
    for k, i in enumerate([0, 1, 4]):
        n = int(batch.attention_mask[i].sum())
        assert torch.equal(out.input_ids[k, :n], batch.input_ids[i, :n])
        assert torch.equal(out.tensors["advantages"][k, :n], batch.tensors["advantages"][i, :n])
        assert int(out.attention_mask[k].sum()) == n
    empty = select_rows(batch, torch.zeros(5, dtype=torch.bool))
    assert empty.input_ids.shape[0] == 0


def test_a_row_with_one_nonzero_token_is_kept() -> None:
    batch = group_batch([(3, [4, 4], 0.0)], seed=1)
    batch.tensors["advantages"][1, 5] = 0.5  # a response token of row 1
    assert rows_with_signal(batch).tolist() == [False, True]
    batch.tensors["advantages"][0, 0] = 0.5  # a prompt position: not a loss token
    assert rows_with_signal(batch).tolist() == [False, True]


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_pruned_steps_match_full_steps(tiny_qwen2_dir: Path, shared_prefix: bool) -> None:
    opt = OptimizerConfig(lr=1e-2)
    cfg = TrainerConfig(optimizer=opt, shared_prefix=shared_prefix)
    full, pruned = (TorchTrainingEngine(tiny_qwen2_dir, cfg) for _ in range(2))
    objective = PolicyObjective(PolicyLossConfig(), old_policy="current")
    steps = [
        # mixed micro-batches: one group with signal, one without
        [[(5, [4, 7, 1], 1.0), (3, [2, 9], 0.0)], [(4, [3, 3], 0.0), (6, [5, 2], 1.0)]],
        # a micro-batch with no signal at all, next to one with
        [[(5, [4, 6], 0.0), (3, [2, 2], 0.0)], [(2, [5, 1], 1.0)]],
        # a whole step without signal: the optimizer steps on zero gradients
        [[(4, [3, 5], 0.0)], [(3, [4, 4], 0.0)]],
    ]
    dropped = 0
    for s, micro in enumerate(steps):
        batches = [group_batch(g, seed=10 * s + k) for k, g in enumerate(micro)]
        tokens = sum(float(b.loss_mask.sum()) for b in batches)
        ctx = LossContext(
            global_tokens=tokens, global_sequences=sum(len(b.input_ids) for b in batches)
        )
        full.begin_step(ctx)
        pruned.begin_step(ctx)
        for b in batches:
            full.accumulate(b, objective)
            keep = rows_with_signal(b)
            dropped += int((~keep).sum())
            if keep.any():
                pruned.accumulate(select_rows(b, keep), objective)
        grads = {n: p.grad for n, p in full.module.named_parameters()}
        for n, p in pruned.module.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4, msg=n)
        before = {n: t.clone() for n, t in pruned.named_weights()}
        a, b = full.finish_step(), pruned.finish_step()
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-7)
    assert dropped == 12
    want = dict(full.named_weights())
    for name, tensor in pruned.named_weights():
        torch.testing.assert_close(tensor, want[name], atol=1e-5, rtol=0, msg=name)
    # the last step had no signal, yet AdamW's momentum moved the weights (in both engines)
    moved = [n for n, t in pruned.named_weights() if not torch.equal(t, before[n])]
    assert full.step == pruned.step == 3 and moved


def role(loss: dict[str, float], world_size: int = 1, skip: bool = True) -> ActorRole:
    r = ActorRole({"loss": loss, "skip_zero_advantage": skip})
    r.engine = SimpleNamespace(world_size=world_size)
    return r


def test_actor_prunes_only_when_exact() -> None:
    batch = group_batch([(3, [2, 5], 1.0), (4, [6, 1], 0.0)], seed=2)
    out, skipped = role({})._prune(batch)
    assert skipped == 2 and out.input_ids.shape[0] == 2
    for loss in ({"kl_coef": 0.1}, {"entropy_coef": 0.01}):
        out, skipped = role(loss)._prune(batch)  # the zero rows still carry KL / entropy terms
        assert skipped == 0 and out is batch
    out, skipped = role({}, skip=False)._prune(batch)
    assert skipped == 0 and out is batch


def test_actor_keeps_one_row_per_rank_when_data_parallel() -> None:
    batch = group_batch([(4, [6, 1], 0.0)], seed=3)
    out, skipped = role({})._prune(batch)
    assert skipped == 2 and out.input_ids.shape[0] == 0
    out, skipped = role({}, world_size=2)._prune(batch)
    assert skipped == 1 and out.input_ids.shape[0] == 1
