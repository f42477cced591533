"""The PPO critic engine on a tiny random Qwen2: float32 values under bf16, and checkpoints.

- with ``mixed_precision=bf16`` the backbone runs under autocast, but the value head must not:
  values are float32 (bf16 rounds them to 8 mantissa bits);
- a critic restored from a step's ``critic/`` folder computes the same values; pointed at the
  actor's folder (an LM checkpoint, no value head) its load fails before changing anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncflow.engines.critic import TorchCriticEngine, ValueModel
from asyncflow.engines.protocols import TrainBatch
from asyncflow.engines.torch_trainer import OptimizerConfig, TorchTrainingEngine, TrainerConfig

torch.set_num_threads(1)
VOCAB = 32  # the vocabulary of the tiny_qwen2_dir model (conftest.py)


def _config(**kw: object) -> TrainerConfig:
    return TrainerConfig(optimizer=OptimizerConfig(lr=1e-3), seed=0, device="cpu", **kw)  # type: ignore[arg-type]


def _batch() -> TrainBatch:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    return TrainBatch(ids, mask, mask.float())


def test_value_head_runs_in_float32_under_bf16_autocast(tiny_qwen2_dir: Path) -> None:
    critic = TorchCriticEngine(tiny_qwen2_dir, _config(mixed_precision="bf16"))
    model = critic.value_model
    batch = _batch()
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(batch.input_ids, batch.attention_mask)
        hidden = (
            model.lm.get_decoder()(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            )
            .last_hidden_state.float()
            .clone()
        )
    assert out.dtype == torch.float32
    with torch.no_grad():  # the head in float32 on the (bf16-computed) hidden states
        expected = torch.nn.functional.linear(
            hidden, model.value_head.weight, model.value_head.bias
        ).squeeze(-1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    values = critic.values(batch)  # the engine's path (its own autocast)
    torch.testing.assert_close(values[:, 1:], expected[:, :-1], atol=1e-6, rtol=1e-6)


def test_critic_restores_from_its_folder_and_refuses_the_actors(
    tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    step = tmp_path / "step_000001"
    actor = TorchTrainingEngine(tiny_qwen2_dir, _config())
    actor.save(str(step))
    critic = TorchCriticEngine(tiny_qwen2_dir, _config())
    with torch.no_grad():
        critic.value_model.value_head.weight.mul_(3.0)  # not the seed's initial head
        critic.value_model.value_head.bias.fill_(0.5)
    critic.save(str(step / "critic"))
    batch = _batch()
    fresh = TorchCriticEngine(tiny_qwen2_dir, _config())
    before = {k: v.clone() for k, v in fresh.value_model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="not a critic checkpoint"):
        fresh.load(str(step))  # the actor's folder
    after = fresh.value_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed
    fresh.load(str(step / "critic"))
    torch.testing.assert_close(fresh.values(batch), critic.values(batch), atol=0, rtol=0)
    assert isinstance(fresh.module, ValueModel)
