"""Fixtures shared by the component tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 32  # vocabulary of the ``tiny_qwen2_dir`` model


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-64, vocab-32 random Qwen2 folder (4 query heads, 2 KV heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(config).save_pretrained(str(path))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return path
