"""Benchmark: trainer -> rollout weight sync against a raw broadcast of the same bytes.

Measures :class:`~asyncflow.engines.weight_sync.WeightSender` / ``WeightReceiver`` (manifest,
per-dtype buckets, pipelined broadcasts, receiver iterating every tensor) for the tiny model and
a ~135M-parameter Llama with SmolLM2-135M's shape (random weights), and, in the same run and
group, one raw ``broadcast`` of a single flat buffer of the same byte count: the limit of the
channel. Prints seconds, GB/s and the ratio sync/raw throughput (target >= 70%).

    python benchmarks/bench_weight_sync.py                       # both models, 1 receiver
    python benchmarks/bench_weight_sync.py --receivers 2 --bucket-mb 64 --models smollm
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time
from typing import Any

import torch

from asyncflow.engines.weight_sync import WeightReceiver, WeightSender


def tiny_weights() -> dict[str, torch.Tensor]:
    """The shipped tiny model's weights, or a random model of the same shape if not built."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    try:
        from asyncflow.tasks.tiny_model import ASSET_DIR, _is_complete

        if _is_complete(ASSET_DIR):
            from safetensors.torch import load_file

            return load_file(str(ASSET_DIR / "model.safetensors"))
    except ImportError:
        pass
    config = Qwen2Config(
        vocab_size=18,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    return dict(Qwen2ForCausalLM(config).state_dict())


def smollm_weights() -> dict[str, torch.Tensor]:
    """A random Llama with SmolLM2-135M's configuration (float32, ~135M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(p.shape, generator=gen) * 0.02
        for name, p in model.state_dict().items()
        if name != "lm_head.weight"
    }


def receiver_main(port: int, rank: int, world: int, rounds: int, results: Any) -> None:
    """One receiver process: per model, ``rounds`` syncs then ``rounds`` raw broadcasts."""
    torch.set_num_threads(1)
    receiver = WeightReceiver("127.0.0.1", port, rank, world, timeout_s=300)
    receiver.connect()
    while True:
        times = []
        nbytes = 0
        for _ in range(rounds):
            start = time.perf_counter()
            update = receiver.receive()
            if update.version < 0:
                return
            checksum = 0.0
            for _name, tensor in update:
                checksum += float(tensor.reshape(-1)[0])  # touch every tensor
            times.append(time.perf_counter() - start)
            nbytes = update.bytes
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        for _ in range(rounds):
            receiver.broadcast(buffer)
        results.put((rank, times))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_model(
    name: str,
    weights: dict[str, torch.Tensor],
    sender: WeightSender,
    rounds: int,
    receivers: int,
    results: Any,
) -> None:
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    sync = [sender.send(weights.items(), version=i).seconds for i in range(rounds)]
    raw_buffer = torch.empty(nbytes, dtype=torch.uint8)
    raw = []
    for _ in range(rounds):
        start = time.perf_counter()
        sender.broadcast(raw_buffer)
        raw.append(time.perf_counter() - start)
    receiver_times = [min(results.get()[1]) for _ in range(receivers)]
    best_sync, best_raw = min(sync), min(raw)
    slowest_receiver = max(receiver_times)
    sync_gbps = nbytes / best_sync / 1e9
    print(
        f"{name:8s} {nbytes / 1e6:8.1f} MB  sync {best_sync:6.3f} s ({sync_gbps:5.2f}"
        f" GB/s, receiver {slowest_receiver:6.3f} s)  raw {best_raw:6.3f} s"
        f" ({nbytes / best_raw / 1e9:5.2f} GB/s)  ratio {best_raw / best_sync:6.1%}"
        f"  (median sync {statistics.median(sync):.3f} s, raw {statistics.median(raw):.3f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--bucket-mb", type=float, default=128)
    parser.add_argument("--direct-mb", type=float, default=1.0, help="<= 0: pack everything")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = args.receivers + 1
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=receiver_main, args=(port, rank, world, args.rounds, results))
        for rank in range(1, world)
    ]
    for proc in procs:
        proc.start()
    bucket_bytes = int(args.bucket_mb * (1 << 20))
    direct = int(args.direct_mb * (1 << 20)) if args.direct_mb > 0 else None
    sender = WeightSender(
        "127.0.0.1", port, world, bucket_bytes=bucket_bytes, direct_bytes=direct, timeout_s=300
    )
    sender.connect()
    print(f"gloo on loopback, {args.receivers} receiver(s), buckets of {args.bucket_mb} MiB")
    builders = {"tiny": tiny_weights, "smollm": smollm_weights}
    for name in args.models:
        weights = builders[name]()
        print(f"{name}: {sum(t.numel() for t in weights.values()) / 1e6:.1f}M parameters")
        bench_model(name, weights, sender, args.rounds, args.receivers, results)
    sender.send([], version=-1)  # tells the receivers to exit
    for proc in procs:
        proc.join(timeout=60)


if __name__ == "__main__":
    main()
