"""The PyTorch training engines on a tiny random Qwen2: log-probs, steps, checkpoints, DDP, critic.

Each test builds engines from a 2-layer, hidden-64, vocab-32 Qwen2 folder written to a temporary
directory; the data-parallel test spawns two gloo processes on the loopback interface.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from asyncflow.algorithms import PolicyLossConfig, PolicyObjective, ValueObjective
from asyncflow.engines.critic import TorchCriticEngine
from asyncflow.engines.protocols import LossContext, TrainBatch, TrainingEngine
from asyncflow.engines.torch_trainer import (
    DistributedConfig,
    OptimizerConfig,
    TorchTrainingEngine,
    TrainerConfig,
    token_logprobs,
)

torch.set_num_threads(1)
VOCAB = 32  # the vocabulary of the tiny_qwen2_dir model (conftest.py)


@pytest.fixture
def model_dir(tiny_qwen2_dir: Path) -> Path:
    return tiny_qwen2_dir


def make_batch(seed: int = 0, rows: int = 4, length: int = 10, prompt: int = 3) -> TrainBatch:
    """Right-padded rows: ``prompt`` prompt tokens, then 3 .. length - prompt response tokens."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    loss_mask = torch.zeros(rows, length)
    for r in range(rows):
        end = length - (r % 3)  # rows end at length, length - 1, length - 2, ...
        attention_mask[r, :end] = 1
        loss_mask[r, prompt:end] = 1.0
        input_ids[r, end:] = 0
    advantages = torch.randn(rows, 1, generator=gen) * loss_mask  # (B, T)
    return TrainBatch(input_ids, attention_mask, loss_mask, {"advantages": advantages})


def split(batch: TrainBatch, parts: int) -> list[TrainBatch]:
    size = batch.input_ids.shape[0] // parts
    return [
        TrainBatch(
            batch.input_ids[i : i + size],
            batch.attention_mask[i : i + size],
            batch.loss_mask[i : i + size],
            {k: v[i : i + size] for k, v in batch.tensors.items()},
        )
        for i in range(0, size * parts, size)
    ]


def config(lr: float = 1e-3, **kw: object) -> TrainerConfig:
    """A CPU config (also on a CUDA machine: two ranks cannot share one GPU under NCCL)."""
    opt = OptimizerConfig(lr=lr, max_grad_norm=1.0)
    return TrainerConfig(optimizer=opt, seed=0, device="cpu", **kw)  # type: ignore[arg-type]


def test_logprobs_match_manual_log_softmax(model_dir: Path) -> None:
    engine = TorchTrainingEngine(model_dir, config(logprob_chunk=3), trainable=False)
    as_protocol: TrainingEngine = engine  # static check that the engine fits the protocol
    assert as_protocol is engine
    batch = make_batch()
    out = engine.logprobs(batch, with_entropy=True)
    with torch.no_grad():
        logits = engine.module(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
    manual = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T-1)
    keep = batch.attention_mask[:, 1:].bool()
    assert out["logprobs"].shape == batch.input_ids.shape
    assert out["logprobs"].dtype == torch.float32
    assert torch.all(out["logprobs"][:, 0] == 0)
    assert torch.all(out["logprobs"][~batch.attention_mask.bool()] == 0)
    torch.testing.assert_close(out["logprobs"][:, 1:][keep], manual[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["entropy"][:, 1:][keep], entropy[keep], atol=1e-5, rtol=0)
    chunked = token_logprobs(logits, batch.input_ids, chunk=4, with_entropy=True)
    torch.testing.assert_close(chunked["logprobs"][:, 1:][keep], manual[keep], atol=1e-5, rtol=0)
    leaf = logits.clone().requires_grad_(True)
    assert token_logprobs(leaf, batch.input_ids, with_entropy=True)["entropy"].requires_grad
    no_graph = token_logprobs(leaf, batch.input_ids, with_entropy=True, entropy_grad=False)
    assert not no_graph["entropy"].requires_grad and no_graph["logprobs"].requires_grad
    with pytest.raises(RuntimeError, match="trainable"):
        engine.train_step([batch], PolicyObjective())


def test_train_step_lowers_loss_on_the_batch(model_dir: Path) -> None:
    engine = TorchTrainingEngine(model_dir, config(lr=1e-2))
    batch = make_batch()
    batch.tensors["old_logprobs"] = engine.logprobs(batch)["logprobs"]
    objective = PolicyObjective(PolicyLossConfig(clip_low=10.0, clip_high=10.0))
    ctx = LossContext(float(batch.loss_mask.sum()), 4)

    def loss_now() -> float:
        out = engine.logprobs(batch, with_entropy=True)
        return float(objective(out, batch, ctx)[0])

    before = loss_now()
    metrics = engine.train_step(split(batch, 2), objective)
    after = loss_now()
    assert metrics["loss"] == pytest.approx(before, abs=1e-5)
    assert metrics["tokens"] == float(batch.loss_mask.sum())
    assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(1e-2)
    assert {"clip_frac", "tis_weight_max", "entropy", "pg_loss"} <= set(metrics)
    assert after < before - 1e-3
    assert engine.step == 1


def test_bf16_autocast_trains_in_float32_state(model_dir: Path) -> None:
    """mixed_precision="bf16": log-probs near the float32 ones (bf16 rounding only), weights,
    gradients and optimizer state stay float32, and a step still lowers the loss."""
    exact = TorchTrainingEngine(model_dir, config(), trainable=False)
    engine = TorchTrainingEngine(model_dir, config(lr=1e-2, mixed_precision="bf16"))
    batch = make_batch()
    keep = batch.attention_mask.bool()
    want = exact.logprobs(batch)["logprobs"][keep]
    got = engine.logprobs(batch)["logprobs"]
    assert got.dtype == torch.float32
    diff = (got[keep] - want).abs()
    assert 0 < float(diff.max()) < 0.1  # rounded (so autocast is on), but close
    batch.tensors["old_logprobs"] = got
    objective = PolicyObjective(PolicyLossConfig(clip_low=10.0, clip_high=10.0))
    ctx = LossContext(float(batch.loss_mask.sum()), 4)
    before = float(objective(engine.logprobs(batch), batch, ctx)[0])
    engine.train_step(split(batch, 2), objective)
    assert float(objective(engine.logprobs(batch), batch, ctx)[0]) < before - 1e-3
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    with pytest.raises(ValueError, match="mixed_precision"):
        TorchTrainingEngine(model_dir, config(mixed_precision="fp8")).logprobs(batch)


def test_named_weights_are_hf_state_dict_names(model_dir: Path) -> None:
    engine = TorchTrainingEngine(model_dir, config(), trainable=False)
    names = {name for name, _ in engine.named_weights()}
    assert names == set(load_file(str(model_dir / "model.safetensors")))


def test_save_load_restores_weights_and_next_step(model_dir: Path, tmp_path: Path) -> None:
    opt = OptimizerConfig(lr=1e-3, weight_decay=0.1, warmup_steps=4)
    cfg = TrainerConfig(optimizer=opt, device="cpu")
    engine = TorchTrainingEngine(model_dir, cfg)
    objective = PolicyObjective()
    first = engine.train_step([make_batch(1)], objective)
    assert first["lr"] == pytest.approx(1e-3 / 4)
    ckpt = tmp_path / "ckpt"
    engine.save(str(ckpt))
    for name in (
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "tokenizer_config.json",
    ):
        assert (ckpt / name).exists(), name
    restored = TorchTrainingEngine(ckpt, cfg)
    restored.load(str(ckpt))
    assert restored.step == 1
    for (n1, w1), (n2, w2) in zip(engine.named_weights(), restored.named_weights(), strict=True):
        assert n1 == n2 and torch.equal(w1, w2), n1
    m1 = engine.train_step([make_batch(2)], objective)
    m2 = restored.train_step([make_batch(2)], objective)
    assert m1["lr"] == m2["lr"] == pytest.approx(2e-3 / 4)
    for (n1, w1), (_, w2) in zip(engine.named_weights(), restored.named_weights(), strict=True):
        assert torch.equal(w1, w2), n1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ddp_worker(rank: int, model_dir: str, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    dist_cfg = DistributedConfig(rank=rank, world_size=2, master_port=port)
    engine = TorchTrainingEngine(model_dir, config(), dist_cfg)
    for step in range(2):
        half = split(make_batch(10 + step, rows=8), 2)[rank]
        metrics = engine.train_step(split(half, 2), PolicyObjective())
    critic = TorchCriticEngine(model_dir, config(), dist_cfg)
    critic.train_step(split(_with_returns(split(make_batch(20, rows=8), 2)[rank]), 2), _VALUE)
    if rank == 0:
        weights = {n: w.contiguous() for n, w in engine.named_weights()}
        save_file(weights, str(Path(out_dir) / "ddp.safetensors"))
        critic_weights = {n: w.contiguous() for n, w in critic.named_weights()}
        save_file(critic_weights, str(Path(out_dir) / "critic.safetensors"))
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics))
    torch.distributed.destroy_process_group()


_VALUE = ValueObjective(clip_range=0.2)


def _with_returns(batch: TrainBatch) -> TrainBatch:
    """Add ``returns`` and old ``values`` columns for the critic's loss."""
    length = batch.input_ids.shape[1]
    batch.tensors["returns"] = torch.linspace(-1, 1, length) * batch.loss_mask
    batch.tensors["values"] = torch.full_like(batch.loss_mask, 0.1) * batch.loss_mask
    return batch


def test_two_gloo_ranks_match_one_process(model_dir: Path, tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(str(model_dir), str(tmp_path), _free_port()), nprocs=2)
    single = TorchTrainingEngine(model_dir, config())
    for step in range(2):
        metrics = single.train_step(split(make_batch(10 + step, rows=8), 4), PolicyObjective())
    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    moved = 0.0
    initial = load_file(str(model_dir / "model.safetensors"))
    for name, weight in single.named_weights():
        torch.testing.assert_close(ddp[name], weight, atol=1e-5, rtol=0)
        moved = max(moved, float((weight - initial[name]).abs().max()))
    assert moved > 1e-4  # the step really changed the weights
    critic = TorchCriticEngine(model_dir, config())
    critic.train_step(split(_with_returns(make_batch(20, rows=8)), 4), _VALUE)
    ddp_critic = load_file(str(tmp_path / "critic.safetensors"))
    for name, weight in critic.named_weights():
        torch.testing.assert_close(ddp_critic[name], weight, atol=1e-5, rtol=0)
    ddp_metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert ddp_metrics["tokens"] == metrics["tokens"]
    assert ddp_metrics["loss"] == pytest.approx(metrics["loss"], abs=1e-5)
    assert ddp_metrics["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-4)


def test_critic_value_loss_falls_and_checkpoints(model_dir: Path, tmp_path: Path) -> None:
    critic = TorchCriticEngine(model_dir, config(lr=1e-3))
    batch = make_batch(3)
    values = critic.values(batch)
    assert values.shape == batch.input_ids.shape and torch.all(values[:, 0] == 0)
    batch.tensors["returns"] = torch.linspace(-1, 1, batch.input_ids.shape[1]) * batch.loss_mask
    objective = ValueObjective(clip_range=None)
    losses = [critic.train_step([batch], objective)["loss"] for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses
    critic.save(str(tmp_path / "critic"))
    restored = TorchCriticEngine(tmp_path / "critic", config(lr=1e-3))
    restored.load(str(tmp_path / "critic"))
    torch.testing.assert_close(restored.values(batch), critic.values(batch), atol=0, rtol=0)


def test_a_skipped_step_still_advances_the_policy_version(model_dir: Path) -> None:
    """A non-finite gradient skips the optimizer step but not the version: the controller admits
    rollouts and names checkpoints by it (k = 0 would otherwise wait forever for version s + 1)."""
    engine = TorchTrainingEngine(model_dir, config())
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    bad = make_batch()
    bad.tensors["advantages"] = torch.full_like(bad.tensors["advantages"], float("nan"))
    out = engine.train_step([bad], PolicyObjective())
    assert out["skipped"] == 1.0 and engine.step == 1
    after = engine.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights untouched
    out = engine.train_step([make_batch()], PolicyObjective())
    assert out["skipped"] == 0.0 and engine.step == 2
