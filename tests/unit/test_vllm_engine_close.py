"""Closing the vLLM adapter answers every caller, also one that posts while it closes.

The adapter's thread/queue logic runs here over a stand-in for vLLM's ``LLMEngine`` (the real
engine is covered by tests/component/test_rollout_engines.py): requests finish after a few
steps, and freeing the engine takes a while, which is the window in which a request admitted
during ``close()`` (say, a rollout batch let in by step-ordered admission as the older step's
batch was aborted) used to be queued behind the stop and wait forever.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from asyncflow.engines.protocols import SamplingConfig
from asyncflow.engines.vllm_engine import VLLMRolloutEngine


class FakeLLMEngine:
    """Each request yields one token per step and finishes after three."""

    model_config = SimpleNamespace(hf_config=SimpleNamespace(eos_token_id=2))

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}

    def add_request(self, request_id: str, prompt: Any, params: Any) -> None:
        self.requests[request_id] = 0

    def abort_request(self, ids: list[str]) -> None:
        for i in ids:
            self.requests.pop(i, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[Any]:
        time.sleep(0.002)
        outs = []
        for rid in list(self.requests):
            self.requests[rid] += 1
            if self.requests[rid] >= 3:
                del self.requests[rid]
                sample = SimpleNamespace(
                    token_ids=[5, 6, 7],
                    logprobs=[{t: SimpleNamespace(logprob=-1.0)} for t in (5, 6, 7)],
                    finish_reason="length",
                )
                outs.append(SimpleNamespace(request_id=rid, finished=True, outputs=[sample]))
        return outs

    def __del__(self) -> None:
        time.sleep(0.3)  # vLLM takes a while to free an engine: the window of the race


class FakeEngineAdapter(VLLMRolloutEngine):
    def _build(self) -> Any:
        self._eos_token_ids = [2]
        return FakeLLMEngine()


@pytest.fixture(autouse=True)
def plain_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("asyncflow.engines.vllm_engine._sampling_params", lambda s, e: None)
    monkeypatch.setattr("vllm.inputs.TokensPrompt", dict, raising=False)


async def test_generate_then_close() -> None:
    engine = FakeEngineAdapter("unused")
    await engine.start()
    out = await engine.generate("a", [1, 2], SamplingConfig(max_new_tokens=3))
    assert out.token_ids == [5, 6, 7] and out.finish_reason == "length"
    await engine.close()
    with pytest.raises(RuntimeError, match="not running"):
        await engine.generate("b", [1, 2], SamplingConfig(max_new_tokens=3))


async def test_every_caller_is_answered_when_closing() -> None:
    engine = FakeEngineAdapter("unused")
    await engine.start()
    stop = asyncio.Event()
    outcomes: list[str] = []

    async def caller(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                out = await engine.generate(f"c{k}-{i}", [1], SamplingConfig(max_new_tokens=3))
                outcomes.append(out.finish_reason)
            except RuntimeError as e:
                outcomes.append(str(e))
                if "not running" in str(e):
                    return
            await asyncio.sleep(0)

    callers = [asyncio.create_task(caller(k)) for k in range(8)]
    await asyncio.sleep(0.05)
    await engine.close()
    stop.set()
    # a caller queued behind the stop used to hang here forever
    await asyncio.wait_for(asyncio.gather(*callers), timeout=10)
    assert "length" in outcomes  # requests completed before the close
    allowed = {"length", "abort", "engine closed", "engine is not running (call start() first)"}
    assert set(outcomes) <= allowed, set(outcomes) - allowed
