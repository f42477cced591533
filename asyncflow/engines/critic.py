"""PyTorch critic engine: a value head on a causal LM's last hidden state, for PPO.

Owns the critic's forward (``values``), its training on the clipped value loss (through the
shared ``train_step`` of :class:`~asyncflow.engines.torch_trainer.TorchEngineBase`) and its
checkpoints: the backbone as an ordinary HF causal-LM folder plus ``value_head.safetensors``.

Values are aligned like log-probs: ``values[:, t]`` is the value of the state *before* token
``x_t`` (the head applied to the hidden state at ``t - 1``); column 0 and padding are 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from asyncflow.engines.protocols import TrainBatch
from asyncflow.engines.torch_trainer import TorchEngineBase, load_model_weights

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """A causal LM's decoder with a linear value head; the LM head stays unused and frozen."""

    def __init__(self, lm: Any, seed: int = 0) -> None:
        super().__init__()
        self.lm: Any = lm  # a transformers PreTrainedModel (causal LM)
        hidden = int(lm.config.hidden_size)
        self.value_head = nn.Linear(hidden, 1)
        gen = torch.Generator().manual_seed(seed)  # the head's init depends on the seed only
        with torch.no_grad():
            weight = torch.randn(self.value_head.weight.shape, generator=gen) / hidden**0.5
            self.value_head.weight.copy_(weight)
            self.value_head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        decoder = self.lm.get_decoder()
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (B, T, H)
        # the head in float32 even under bf16 autocast (critic.mixed_precision=bf16): values
        # are regression targets' estimates, bf16's 8 mantissa bits would round them coarsely
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)  # (B, T) float32


class TorchCriticEngine(TorchEngineBase):
    """The PPO critic: ``values(batch) -> (B, T)`` and ``train_step`` with a value loss
    (e.g. :class:`asyncflow.algorithms.objectives.ValueObjective`)."""

    def _build(self, model_path: str) -> nn.Module:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=torch.float32,
            attn_implementation=self.config.attn_implementation,
        )
        model = ValueModel(lm, seed=self.config.seed)
        head = Path(model_path) / VALUE_HEAD_FILE
        if head.exists():
            model.value_head.load_state_dict(load_file(str(head)))
        return model

    @property
    def value_model(self) -> ValueModel:
        """The unwrapped backbone + value head."""
        assert isinstance(self.module, ValueModel)
        return self.module

    def _freeze_unused(self) -> None:
        lm = self.value_model.lm
        out_emb, in_emb = lm.get_output_embeddings(), lm.get_input_embeddings()
        if out_emb is not None and out_emb.weight is not in_emb.weight:
            out_emb.requires_grad_(False)

    def _outputs(
        self, module: nn.Module, batch: TrainBatch, with_entropy: bool, entropy_grad: bool = False
    ) -> dict[str, torch.Tensor]:
        with self._autocast():
            state_values = module(batch.input_ids, batch.attention_mask).float()  # (B, T)
        zeros = torch.zeros_like(state_values[:, :1])  # (B, 1)
        values = torch.cat([zeros, state_values[:, :-1]], dim=1)  # (B, T): V before x_t
        keep = batch.attention_mask.bool()
        return {"values": torch.where(keep, values, torch.zeros_like(values))}

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """Per-token float32 values (B, T) on the CPU, aligned to input positions."""
        return self._forward_no_grad(batch, with_entropy=False)["values"]

    def _save_model(self, path: Path) -> None:
        model = self.value_model
        model.lm.save_pretrained(str(path), safe_serialization=True)
        head = model.value_head.state_dict()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in head.items()}, str(path / VALUE_HEAD_FILE)
        )

    def _load_model(self, path: Path) -> None:
        head_file = path / VALUE_HEAD_FILE
        if not head_file.is_file():  # checked first: a failed load changes nothing
            raise FileNotFoundError(
                f"no {VALUE_HEAD_FILE} in {path}: not a critic checkpoint (a step's critic is "
                "saved in its critic/ sub-folder)"
            )
        head = load_file(str(head_file))
        load_model_weights(self.module, path, prefix="lm.")
        self.value_model.value_head.load_state_dict(head)


__all__ = ["VALUE_HEAD_FILE", "TorchCriticEngine", "ValueModel"]
