"""Shared-prompt packing in the training engine: the same log-probs, entropies, gradients and
optimizer steps as the padded layout, with fewer positions computed.

A 2-layer random Qwen2 (4 query heads, 2 KV heads) written to a temporary folder; batches hold
GRPO-like groups (rows sharing a prompt, responses of different lengths, an empty response), rows
with a prompt of their own, and padding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncflow.algorithms import PolicyLossConfig, PolicyObjective
from asyncflow.engines.packing import pack_shared_prompts
from asyncflow.engines.protocols import LossContext, TrainBatch
from asyncflow.engines.torch_trainer import OptimizerConfig, TorchTrainingEngine, TrainerConfig

torch.set_num_threads(1)
VOCAB = 32  # the vocabulary of the tiny_qwen2_dir model (conftest.py)


@pytest.fixture
def model_dir(tiny_qwen2_dir: Path) -> Path:
    return tiny_qwen2_dir


def grouped_batch(spec: list[tuple[int, list[int]]], seed: int = 0) -> TrainBatch:
    """``spec``: (prompt length, [response length per row]) per group; rows right-padded."""
    gen = torch.Generator().manual_seed(seed)
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    for p_len, r_lens in spec:
        prompt = torch.randint(1, VOCAB, (p_len,), generator=gen)
        rows += [(prompt, torch.randint(1, VOCAB, (r,), generator=gen)) for r in r_lens]
    T = max(len(p) + len(r) for p, r in rows) + 2  # extra padding on every row
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.int64)
    att = torch.zeros(B, T, dtype=torch.int64)
    loss = torch.zeros(B, T)
    for i, (p, r) in enumerate(rows):
        n_p, n = len(p), len(p) + len(r)
        ids[i, :n_p], ids[i, n_p:n] = p, r
        att[i, :n] = 1
        loss[i, n_p:n] = 1.0
    adv = torch.randn(B, 1, generator=gen) * loss
    behaviour = -torch.rand(B, T, generator=gen) * loss
    return TrainBatch(ids, att, loss, {"advantages": adv, "rollout_logprobs": behaviour})


SPEC = [(5, [4, 7, 1, 6]), (3, [2, 9]), (6, [3]), (4, [5, 0, 3])]


def engines(model_dir: Path) -> tuple[TorchTrainingEngine, TorchTrainingEngine]:
    opt = OptimizerConfig(lr=1e-2)
    padded = TorchTrainingEngine(model_dir, TrainerConfig(optimizer=opt, shared_prefix=False))
    packed = TorchTrainingEngine(model_dir, TrainerConfig(optimizer=opt, shared_prefix=True))
    return padded, packed


def test_layout_shares_each_prompt_once() -> None:
    batch = grouped_batch(SPEC)
    packed = pack_shared_prompts(batch)
    assert packed is not None
    assert packed.input_ids.shape[0] == 4  # one sequence per prompt group
    # each group: its prompt once plus every response
    lengths = [p + sum(rs) for p, rs in SPEC]
    assert packed.input_ids.shape[1] == max(lengths)
    assert packed.positions < batch.input_ids.numel()
    # every real token after the first gets exactly one log-prob slot
    assert len(packed.rows) == int(batch.attention_mask.sum()) - batch.input_ids.shape[0]
    # response k of a group restarts its positions right after the prompt
    g0 = packed.position_ids[0].tolist()
    assert g0[:5] == [0, 1, 2, 3, 4] and g0[5:9] == [5, 6, 7, 8] and g0[9:16] == list(range(5, 12))


def test_no_shared_prompt_keeps_padded_layout() -> None:
    assert pack_shared_prompts(grouped_batch([(4, [3]), (5, [2]), (3, [6])])) is None
    assert pack_shared_prompts(grouped_batch([(4, [3])])) is None


def test_left_padded_batch_keeps_padded_layout() -> None:
    batch = grouped_batch([(4, [3, 2])])
    left = TrainBatch(
        batch.input_ids.flip(1), batch.attention_mask.flip(1), batch.loss_mask.flip(1)
    )
    assert pack_shared_prompts(batch) is not None
    assert pack_shared_prompts(left) is None


def test_same_prompt_in_separate_runs_is_not_merged() -> None:
    """Only consecutive rows are grouped: rows A, B, A give three sequences."""
    a = grouped_batch([(4, [3])], seed=1)
    b = grouped_batch([(4, [3])], seed=2)
    T = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]))

    rows = [a, b, a, a]
    batch = TrainBatch(
        torch.cat([pad(r.input_ids) for r in rows]),
        torch.cat([pad(r.attention_mask) for r in rows]),
        torch.cat([pad(r.loss_mask) for r in rows]),
    )
    packed = pack_shared_prompts(batch)
    assert packed is not None and packed.input_ids.shape[0] == 3


def test_logprobs_and_entropy_match_padded(model_dir: Path) -> None:
    padded, packed = engines(model_dir)
    batch = grouped_batch(SPEC)
    want = padded.logprobs(batch, with_entropy=True)
    got = packed.logprobs(batch, with_entropy=True)
    for key in ("logprobs", "entropy"):
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4)
    # padding and column 0 stay exactly zero
    pad = batch.attention_mask == 0
    assert bool((got["logprobs"][pad] == 0).all()) and bool((got["logprobs"][:, 0] == 0).all())


def test_training_steps_match_padded(model_dir: Path) -> None:
    """Same loss, same gradients, same weights after two optimizer steps."""
    padded, packed = engines(model_dir)
    objective = PolicyObjective(PolicyLossConfig(entropy_coef=0.01), old_policy="current")
    for step in range(2):
        batches = [grouped_batch(SPEC, seed=10 * step + k) for k in range(2)]
        outs = [e.train_step(batches, objective) for e in (padded, packed)]
        assert outs[1]["loss"] == pytest.approx(outs[0]["loss"], rel=1e-4, abs=1e-6)
        assert outs[1]["grad_norm"] == pytest.approx(outs[0]["grad_norm"], rel=1e-3)
    # AdamW moves every weight by about lr = 1e-2 per step; rounding differences in the
    # gradients may move a weight by far less than 1% of one step
    want = dict(padded.named_weights())
    for name, tensor in packed.named_weights():
        torch.testing.assert_close(tensor, want[name], atol=1e-4, rtol=0, msg=name)


def test_streaming_accumulate_matches_padded(model_dir: Path) -> None:
    padded, packed = engines(model_dir)
    objective = PolicyObjective(PolicyLossConfig(), old_policy="current")
    ctx = LossContext(global_tokens=60.0, global_sequences=12)
    for e in (padded, packed):
        e.begin_step(ctx)
        e.accumulate(grouped_batch(SPEC, seed=3), objective)
    grads = [
        {n: p.grad.clone() for n, p in e.module.named_parameters() if p.grad is not None}
        for e in (padded, packed)
    ]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][name], atol=1e-5, rtol=1e-3, msg=name)
