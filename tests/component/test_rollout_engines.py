"""Rollout engines against a plain transformers forward: log-prob parity, stops, abort, and
weight sync into a running vLLM engine (one vLLM start shared by the module's vLLM tests)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from asyncflow.engines.hf_engine import HFRolloutEngine
from asyncflow.engines.protocols import Completion, RolloutEngine, SamplingConfig
from asyncflow.engines.weight_sync import WeightReceiver, WeightSender

PARITY_MAX = 1e-3  # float32 both sides; measured on tiny-adder: max 8.5e-6 (3.3e-5 after a sync)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_model_dir(tmp: Path) -> Path:
    """The shipped tiny model if it is built, else a random 4-layer Qwen2 saved under ``tmp``."""
    try:
        from asyncflow.tasks.tiny_model import ASSET_DIR, _is_complete

        if _is_complete(ASSET_DIR):
            return Path(ASSET_DIR)
    except ImportError:
        pass
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=18,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(tmp / "tiny")
    return tmp / "tiny"


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [[1, *torch.randint(4, 18, (3 + i % 6,), generator=gen).tolist()] for i in range(n)]


def logprob_diffs(
    model: torch.nn.Module, prompt_ids: Sequence[list[int]], outs: Sequence[Completion]
) -> torch.Tensor:
    """|engine log-prob - float32 transformers log-prob| of every generated token."""
    diffs = []
    for prompt, out in zip(prompt_ids, outs):
        assert len(out.token_ids) == len(out.logprobs) > 0
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]  # (T, V)
        ref = logp[len(prompt) - 1 : -1].gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        diffs.append((ref - torch.tensor(out.logprobs)).abs())
    return torch.cat(diffs)


def reference(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


async def generate_all(
    engine: RolloutEngine, tag: str, prompt_ids: list[list[int]], sampling: SamplingConfig
) -> list[Completion]:
    return list(
        await asyncio.gather(
            *(engine.generate(f"{tag}-{i}", p, sampling) for i, p in enumerate(prompt_ids))
        )
    )


async def check_stops_and_abort(engine: RolloutEngine, eos: int) -> None:
    outs = await generate_all(engine, "stop", prompts(24), SamplingConfig(max_new_tokens=12))
    for out in outs:
        assert out.finish_reason in ("stop", "length")
        assert len(out.token_ids) <= 12
        assert (out.finish_reason == "stop") == (out.token_ids[-1] == eos)
        assert eos not in out.token_ids[:-1]
    long = SamplingConfig(max_new_tokens=100, ignore_eos=True)
    task = asyncio.create_task(engine.generate("to-abort", [1, 5, 6], long))
    other = asyncio.create_task(engine.generate("kept", [1, 5, 6], SamplingConfig(8)))
    await asyncio.sleep(0)
    await engine.abort("to-abort")
    aborted = await asyncio.wait_for(task, 60)
    assert aborted.finish_reason == "abort" and len(aborted.token_ids) < 100
    assert (await asyncio.wait_for(other, 60)).finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


async def test_hf_engine_parity_stops_and_abort(model_dir: Path) -> None:
    engine = HFRolloutEngine(str(model_dir), max_batch_size=32)
    await engine.start()
    assert isinstance(engine, RolloutEngine)
    batch = prompts(16)
    outs = await generate_all(engine, "p", batch, SamplingConfig(max_new_tokens=16))
    diffs = logprob_diffs(reference(model_dir), batch, outs)
    print(f"HF parity: max {diffs.max():.2e} mean {diffs.mean():.2e} over {diffs.numel()} tokens")
    assert diffs.max() < PARITY_MAX
    await check_stops_and_abort(engine, engine.eos_token_ids[0])
    model = reference(model_dir)
    new_weights = perturbed(model)
    await engine.load_weights(new_weights.items(), version=3)
    assert engine.policy_version == 3
    after = await generate_all(engine, "after", batch, SamplingConfig(max_new_tokens=16))
    assert {o.policy_version for o in after} == {3}
    model.load_state_dict(new_weights, strict=False)
    assert logprob_diffs(model, batch, after).max() < PARITY_MAX
    await engine.close()


async def test_hf_engine_close_answers_a_batch_it_was_gathering(model_dir: Path) -> None:
    """close() while the batcher holds requests it has taken off the queue (waiting out its
    batching window): they are answered "abort", not dropped with the cancelled task."""
    engine = HFRolloutEngine(str(model_dir), max_batch_size=8, batch_window_s=30.0)
    await engine.start()
    calls = [
        asyncio.create_task(engine.generate(f"g{i}", [1, 5, 6], SamplingConfig(8)))
        for i in range(3)
    ]
    await asyncio.sleep(0.3)  # the batcher has taken all three and waits for more
    await engine.close()
    outs = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert [o.finish_reason for o in outs] == ["abort"] * 3


# ---- vLLM: one engine start shared by the tests below ---------------------------------------


@pytest.fixture(scope="module")
def vllm_engine(model_dir: Path) -> Iterator[RolloutEngine]:
    pytest.importorskip("vllm")
    from asyncflow.engines.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(str(model_dir), max_model_len=128, dtype="float32", seed=0)
    asyncio.run(engine.start())  # the engine thread serves callers on any event loop
    yield engine
    asyncio.run(engine.close())


@pytest.mark.vllm
@pytest.mark.slow
async def test_vllm_parity_with_transformers(vllm_engine: RolloutEngine, model_dir: Path) -> None:
    batch = prompts(32)
    outs = await generate_all(vllm_engine, "parity", batch, SamplingConfig(max_new_tokens=16))
    assert {o.policy_version for o in outs} == {0}
    diffs = logprob_diffs(reference(model_dir), batch, outs)
    print(f"vLLM parity: max {diffs.max():.2e} mean {diffs.mean():.2e} over {diffs.numel()} tok")
    assert diffs.max() < PARITY_MAX


@pytest.mark.vllm
@pytest.mark.slow
async def test_vllm_stops_and_abort(vllm_engine: RolloutEngine) -> None:
    from asyncflow.engines.vllm_engine import VLLMRolloutEngine

    assert isinstance(vllm_engine, VLLMRolloutEngine)
    await check_stops_and_abort(vllm_engine, vllm_engine.eos_token_ids[0])


def perturbed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight (embeddings included) scaled and jittered: a visibly different policy."""
    gen = torch.Generator().manual_seed(2)
    return {
        name: tensor * 1.5 + 0.05 * torch.randn(tensor.shape, generator=gen)
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"  # tied to the embeddings
    }


@pytest.mark.vllm
@pytest.mark.slow
async def test_vllm_weight_sync_changes_policy(vllm_engine: RolloutEngine, model_dir: Path) -> None:
    model = reference(model_dir)
    batch = prompts(16)
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    before = await generate_all(vllm_engine, "before", batch, greedy)
    new_weights = perturbed(model)
    port = free_port()
    sender = WeightSender("127.0.0.1", port, 2, bucket_bytes=256 << 10, timeout_s=60)
    receiver = WeightReceiver("127.0.0.1", port, 1, 2, timeout_s=60)
    connecting = threading.Thread(target=sender.connect)
    connecting.start()
    await receiver.aconnect()
    connecting.join()
    sending = asyncio.create_task(sender.asend(new_weights.items(), version=7))
    update = await receiver.areceive()
    await vllm_engine.load_weights(update, update.version)
    await sending
    assert update.done and vllm_engine.policy_version == 7
    assert getattr(vllm_engine, "last_reload", None) == "fast"  # straight into the CPU kernels
    after = await generate_all(vllm_engine, "after", batch, greedy)
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    assert {o.policy_version for o in after} == {7}
    model.load_state_dict(new_weights, strict=False)
    model.tie_weights()
    diffs = logprob_diffs(model, batch, after)
    print(f"vLLM parity after sync: max {diffs.max():.2e} mean {diffs.mean():.2e}")
    assert diffs.max() < PARITY_MAX
    sampled = await generate_all(vllm_engine, "t1", batch, SamplingConfig(max_new_tokens=16))
    assert logprob_diffs(model, batch, sampled).max() < PARITY_MAX


@pytest.mark.vllm
@pytest.mark.slow
async def test_vllm_seeded_prompts_beyond_one_step_budget(vllm_engine: RolloutEngine) -> None:
    """64 seeded prompts of 81 tokens exceed a step's token budget (2048): with chunked
    prefill vLLM 0.32 on CPU died on the first split prompt ("CPU Generator does not use
    offset"); every rollout request is seeded."""
    long = [[1, *[4 + (i + j) % 14 for j in range(80)]] for i in range(64)]
    outs = await asyncio.wait_for(
        asyncio.gather(
            *(
                vllm_engine.generate(f"long-{i}", p, SamplingConfig(max_new_tokens=8, seed=i))
                for i, p in enumerate(long)
            )
        ),
        120,
    )
    assert all(o.finish_reason in ("stop", "length") and o.token_ids for o in outs)
    again = await vllm_engine.generate("long-again", long[5], SamplingConfig(8, seed=5))
    assert again.token_ids == outs[5].token_ids  # the seed still decides the sample


@pytest.mark.vllm
@pytest.mark.slow
async def test_vllm_unknown_name_falls_back_to_generic_reload(
    vllm_engine: RolloutEngine, model_dir: Path
) -> None:
    """An update with a tensor the fast path does not know (a rotary ``inv_freq`` buffer,
    which vLLM's own loader skips) is loaded by vLLM's generic reload -- including the tensors
    the fast path had already read -- and the policy is exactly the new one."""
    from asyncflow.engines.vllm_engine import VLLMRolloutEngine

    assert isinstance(vllm_engine, VLLMRolloutEngine)
    model = reference(model_dir)
    full = perturbed(model)
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}
    await vllm_engine.load_weights([*full.items(), *extra.items()], 21)
    assert vllm_engine.last_reload == "generic"
    model.load_state_dict(full, strict=False)
    model.tie_weights()
    batch = prompts(8)
    outs = await generate_all(vllm_engine, "fallback", batch, SamplingConfig(max_new_tokens=12))
    assert {o.policy_version for o in outs} == {21}
    assert logprob_diffs(model, batch, outs).max() < PARITY_MAX
    await vllm_engine.load_weights(list(full.items()), 22)  # the next update is fast again
    assert vllm_engine.last_reload == "fast"
