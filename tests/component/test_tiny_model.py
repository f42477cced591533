"""The shipped tiny model: a transformers folder with the right tokenizer, architecture and a
partial (RL-improvable) greedy accuracy; and the builder that makes it."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from asyncflow.tasks import tiny_model
from asyncflow.tasks.arithmetic import eval_problems
from asyncflow.tasks.tiny_model import (
    ASSET_DIR,
    build_tiny_model,
    build_tokenizer,
    ensure_tiny_model,
    greedy_accuracy,
)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_ensure_returns_the_shipped_folder() -> None:
    path = ensure_tiny_model()
    assert path == ASSET_DIR
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file()
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2


def test_tokenizer_loads_with_autotokenizer_and_matches_the_builder() -> None:
    loaded = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    built = build_tokenizer()
    assert len(loaded) == 18
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    for text in ("345+678=", "13,12,10>1023", "0123456789+=,>"):
        ids = loaded.encode(text)
        assert ids == built.encode(text)
        assert ids[0] == 1 and len(ids) == len(text) + 1  # <bos> + one token per character
        assert loaded.decode(ids, skip_special_tokens=True) == text


def test_model_architecture() -> None:
    path = str(ensure_tiny_model())
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 4
    assert config.hidden_size // config.num_attention_heads == 32  # a head size vLLM CPU supports
    assert config.max_position_embeddings == 128
    model = AutoModelForCausalLM.from_pretrained(path)
    assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.2e6


def test_greedy_accuracy_is_partial() -> None:
    acc = greedy_accuracy(ensure_tiny_model(), eval_problems(64, seed=0))
    assert 0.1 < acc < 0.8  # learned something, with room for RL to improve


def test_builder_writes_a_loadable_folder(tmp_path: Path) -> None:
    record = build_tiny_model(tmp_path / "m", steps=3, seed=1, target_acc=1.0)
    assert record["steps"] == 3 and record["eval_acc_before"] == 0.0
    assert json.loads((tmp_path / "m" / "asyncflow_build.json").read_text())["steps"] == 3
    model: Any = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    out = model.generate(**tok(["1+2="], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and 5 < out.shape[1] <= 8  # 5 prompt tokens, up to 3 new


def test_ensure_builds_into_the_cache_when_the_asset_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Path] = []

    def fake_build(path: Path) -> None:
        path.mkdir(parents=True)
        for name in tiny_model.REQUIRED_FILES:
            (path / name).write_text("{}")
        built.append(path)

    monkeypatch.setattr(tiny_model, "ASSET_DIR", tmp_path / "absent")
    monkeypatch.setattr(tiny_model, "build_tiny_model", fake_build)
    path = tiny_model.ensure_tiny_model(cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "tiny-adder" and built == [path]
    assert tiny_model.ensure_tiny_model(cache_dir=tmp_path / "cache") == path  # no rebuild
    assert len(built) == 1
