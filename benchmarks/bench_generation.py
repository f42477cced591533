"""Benchmark: generation tokens/s of the vLLM adapter against the transformers adapter.

Both engines serve the same model and the same prompts (default 64 prompts x 32 new tokens,
all submitted at once, as the rollout worker does), in two modes: ``fixed`` (``ignore_eos``,
exactly 32 tokens each) and ``eos`` (stop at EOS). One warm-up round per engine, then the best
and median of ``--rounds``. The transformers engine runs first, vLLM second (vLLM binds the OMP
threads of the process it runs in).

    python benchmarks/bench_generation.py                         # the shipped tiny model
    python benchmarks/bench_generation.py --model PATH --max-model-len 512
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from asyncflow.engines.hf_engine import HFRolloutEngine
from asyncflow.engines.protocols import RolloutEngine, SamplingConfig


def default_model() -> str:
    from asyncflow.tasks.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model())


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    low = min(4, vocab - 1)
    return [torch.randint(low, vocab, (6 + i % 8,), generator=gen).tolist() for i in range(n)]


async def rounds_of(
    engine: RolloutEngine, prompts: list[list[int]], sampling: SamplingConfig, rounds: int
) -> list[float]:
    """Tokens/s of each round (the first, warm-up round is not counted)."""
    rates = []
    for r in range(rounds + 1):
        start = time.perf_counter()
        outs = await asyncio.gather(
            *(engine.generate(f"{r}-{i}", p, sampling) for i, p in enumerate(prompts))
        )
        tokens = sum(len(o.token_ids) for o in outs)
        if r > 0:
            rates.append(tokens / (time.perf_counter() - start))
    return rates


async def bench(engine: RolloutEngine, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    await engine.start()
    prompts = make_prompts(args.prompts, vocab)
    results = {}
    for mode, ignore_eos in (("fixed", True), ("eos", False)):
        sampling = SamplingConfig(max_new_tokens=args.new_tokens, ignore_eos=ignore_eos)
        rates = await rounds_of(engine, prompts, sampling, args.rounds)
        results[mode] = max(rates)
        print(f"  {mode:5s}: best {max(rates):8.0f} tok/s, median {statistics.median(rates):8.0f}")
    await engine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="transformers folder (default: tiny)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    model = args.model or default_model()
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(model).vocab_size)
    torch.set_num_threads(args.threads)
    shape = f"{args.prompts} prompts x {args.new_tokens} tokens"
    print(f"model {model}, {shape}, {args.threads} threads")
    print("transformers engine:")
    dtype = getattr(torch, args.dtype)
    hf = asyncio.run(bench(HFRolloutEngine(model, dtype=dtype, max_batch_size=256), args, vocab))
    from asyncflow.engines.vllm_engine import VLLMRolloutEngine

    print("vLLM engine:")
    engine = VLLMRolloutEngine(
        model,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        cpu_threads_bind=f"0-{args.threads - 1}" if args.threads > 1 else "0",
    )
    vllm = asyncio.run(bench(engine, args, vocab))
    for mode in hf:
        print(f"{mode:5s}: vLLM / transformers = {vllm[mode] / hf[mode]:.2f}x")


if __name__ == "__main__":
    main()
