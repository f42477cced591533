"""User reward functions: loading by 'module:function', and scoring that survives raising,
hanging and busy-looping functions (each becomes a recorded failure within the timeout)."""

import asyncio
import textwrap
import time
from pathlib import Path

import pytest

from asyncflow.rewards.functions import (
    FailurePolicy,
    RewardResult,
    RewardScorer,
    load_reward_function,
    spec_of,
)
from asyncflow.rewards.math import arithmetic_reward

USER_MODULE = textwrap.dedent(
    """
    import asyncio, os, time

    NOT_CALLABLE = 3

    def exact(prompt, response, answer):
        return 1.0 if response.strip() == answer else 0.0

    async def async_exact(prompt, response, answer):
        await asyncio.sleep(0)
        return 1.0 if response.strip() == answer else 0.0

    def raises(prompt, response, answer):
        raise KeyError("boom")

    def sleeps(prompt, response, answer):
        time.sleep(60)

    def spins(prompt, response, answer):
        while True:
            pass

    def spins_on_x(prompt, response, answer):
        while response == "x":
            pass
        return 0.5

    def returns_text(prompt, response, answer):
        return "1.0"

    def dies(prompt, response, answer):
        os._exit(3)

    def by_response(prompt, response, answer):
        if response == "x":
            while True:
                pass
        if response == "die":
            os._exit(3)
        if response == "raise":
            raise KeyError("boom")
        return float(response)

    class Holder:
        @staticmethod
        def method(prompt, response, answer):
            return 0.25

    def returns_kind(prompt, response, answer):
        # what common user code returns, named by the response
        import numpy as np
        import torch

        return {
            "bool": response == answer,
            "np.float32": np.float32(0.5),
            "np.int64": np.sum(np.array([1, 2])),
            "np.bool_": np.bool_(True),
            "np.0d": np.array(0.25),
            "torch.0d": torch.tensor(0.75),
            "torch.int": torch.tensor(3),
            "np.nan": np.float64("nan"),
            "torch.inf": torch.tensor(float("inf")),
            "list": [1.0],
            "np.vector": np.array([1.0, 2.0]),
            "torch.vector": torch.tensor([1.0, 2.0]),
            "none": None,
            "text": "1.0",
            "complex": 1j,
            "huge": 10**400,
        }[response]
    """
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_load_reward_function(user_module: str) -> None:
    assert load_reward_function(f"{user_module}:exact")("p", "3", "3") == 1.0
    assert load_reward_function(f"{user_module}:Holder.method")("p", "r", "a") == 0.25
    assert spec_of(arithmetic_reward) == "asyncflow.rewards.math:arithmetic_reward"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must look like"),
        ("no_such_module_xyz:fn", "module 'no_such_module_xyz' not found"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:NOT_CALLABLE", "is not callable"),
    ],
)
def test_load_reward_function_errors(user_module: str, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_reward_function(spec.format(mod=user_module))


def test_local_function_cannot_be_isolated() -> None:
    def local(prompt: str, response: str, answer: str) -> float:
        return 0.0

    with pytest.raises(ValueError, match="isolate=False"):
        RewardScorer(local)


async def test_isolated_scorer_records_every_kind_of_failure(user_module: str) -> None:
    m = user_module
    async with RewardScorer(f"{m}:exact", timeout_s=0.5) as good:
        ok = await good.score("1+2=", " 3", "3")
        wrong = await good.score("1+2=", "4", "3")
    assert ok.score == 1.0 and not ok.failed and ok.error is None and ok.duration_s > 0
    assert wrong == RewardResult(0.0, duration_s=wrong.duration_s)
    cases = {
        "raises": "KeyError: 'boom'",
        "sleeps": "TimeoutError",
        "spins": "TimeoutError",
        "returns_text": "not a number",
        "dies": "reward worker died",
    }
    for name, error in cases.items():
        scorer = RewardScorer(f"{m}:{name}", timeout_s=0.5, failure_policy="regenerate")
        t0 = time.perf_counter()
        result = await scorer.score("p", "r", "a")
        await scorer.aclose()
        assert result.failed and result.score == 0.0, name
        assert result.error is not None and error in result.error, (name, result.error)
        assert result.policy is FailurePolicy.REGENERATE
        assert time.perf_counter() - t0 < 10  # bounded, never hangs


async def test_scorer_recovers_after_a_timeout_and_loop_stays_responsive(user_module: str) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    async with RewardScorer(f"{user_module}:spins_on_x", timeout_s=0.5, num_workers=2) as scorer:
        task = asyncio.create_task(ticker())
        hung, fine = await asyncio.gather(scorer.score("p", "x", "a"), scorer.score("p", "y", "a"))
        task.cancel()
        assert hung.failed and "TimeoutError" in (hung.error or "")
        assert fine == RewardResult(0.5, duration_s=fine.duration_s)
        assert ticks >= 5  # the event loop kept running while a call hung
        again = await scorer.score("p", "y", "a")  # the killed worker was replaced
        assert again.score == 0.5 and not again.failed


async def test_async_function_in_worker(user_module: str) -> None:
    async with RewardScorer(f"{user_module}:async_exact", timeout_s=2.0) as scorer:
        assert (await scorer.score("p", "7", "7")).score == 1.0


async def test_in_process_verifier_and_failures() -> None:
    scorer = RewardScorer(arithmetic_reward, isolate=False, timeout_s=0.5)
    assert (await scorer.score("1+2=", "3>3", "3")).score == 1.0
    assert (await scorer.score("1+2=", "3>4", "3")).score == 0.0
    assert (await scorer.score("1+2=", "the answer is 3", "3")).score == 0.0

    async def hangs(prompt: str, response: str, answer: str) -> float:
        await asyncio.sleep(60)
        return 1.0

    def raises(prompt: str, response: str, answer: str) -> float:
        raise RuntimeError("bad")

    timed_out = await RewardScorer(hangs, isolate=False, timeout_s=0.5).score("p", "r", "a")
    assert timed_out.failed and "TimeoutError" in (timed_out.error or "")
    assert timed_out.policy is FailurePolicy.ZERO
    raised = await RewardScorer(raises, isolate=False, timeout_s=0.5).score("p", "r", "a")
    assert raised.failed and raised.error == "RuntimeError: bad"


async def test_cancelled_call_replaces_the_worker(user_module: str) -> None:
    async with RewardScorer(f"{user_module}:spins_on_x", timeout_s=30.0) as scorer:
        task = asyncio.create_task(scorer.score("p", "x", "a"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t0 = time.perf_counter()
        after = await scorer.score("p", "y", "a")  # a fresh worker, not the spinning one
        assert after.score == 0.5 and not after.failed
        assert time.perf_counter() - t0 < 10


async def test_score_many_isolated_matches_score_item_by_item(user_module: str) -> None:
    """A batch through the child processes: one timeout, one death and one raise in the middle
    fail only their own item; the items after them are scored by a replacement process."""
    items = [("p", r, "a") for r in ["1", "x", "2", "die", "3", "raise", "4"]]
    for workers in (1, 2):
        async with RewardScorer(
            f"{user_module}:by_response", timeout_s=0.5, num_workers=workers
        ) as scorer:
            t0 = time.perf_counter()
            results = await scorer.score_many(items)
            assert time.perf_counter() - t0 < 20
            assert [r.score for r in results] == [1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0]
            errors = [r.error for r in results]
            assert errors[0] is None and errors[2] is None and errors[6] is None
            assert "TimeoutError" in (errors[1] or "")
            assert "reward worker died" in (errors[3] or "")
            assert errors[5] == "KeyError: 'boom'"
            assert [r.failed for r in results] == [False, True, False, True, False, True, False]
            again = await scorer.score_many([("p", "5", "a")] * 3)  # workers were replaced
            assert [r.score for r in again] == [5.0] * 3
            assert await scorer.score_many([]) == []


async def test_score_many_in_process_scores_each_item_once() -> None:
    calls: list[str] = []

    def fn(prompt: str, response: str, answer: str) -> float:
        calls.append(response)
        if response == "slow":
            time.sleep(1.5)
        if response == "bad":
            raise RuntimeError("bad")
        if response == "text":
            return "1"  # type: ignore[return-value]
        return 1.0 if response == answer else 0.0

    scorer = RewardScorer(fn, isolate=False, timeout_s=0.5)
    items = [("p", r, "7") for r in ["7", "slow", "8", "bad", "text", "7"]]
    results = await scorer.score_many(items)
    assert [r.score for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert [r.failed for r in results] == [False, True, False, True, True, False]
    assert "TimeoutError" in (results[1].error or "")
    assert results[3].error == "RuntimeError: bad"
    assert "not a number" in (results[4].error or "")
    await asyncio.sleep(1.5)  # the abandoned thread finishes "slow" and scores nothing more
    assert sorted(calls) == sorted(r for _, r, _ in items)

    builtin = RewardScorer(arithmetic_reward, isolate=False, timeout_s=0.5)
    answers = [("1+2=", "3>3", "3"), ("1+2=", "3>4", "3"), ("1+2=", "x", "3")]
    one_by_one = [(await builtin.score(*it)).score for it in answers]
    assert [r.score for r in await builtin.score_many(answers)] == one_by_one == [1.0, 0.0, 0.0]

    async def async_fn(prompt: str, response: str, answer: str) -> float:
        await asyncio.sleep(0)
        return float(response)

    batch = await RewardScorer(async_fn, isolate=False).score_many([("p", "2", "a")] * 2)
    assert [r.score for r in batch] == [2.0, 2.0]


ACCEPTED = {
    "bool": 1.0,  # response == answer below
    "np.float32": 0.5,
    "np.int64": 3.0,
    "np.bool_": 1.0,
    "np.0d": 0.25,
    "torch.0d": 0.75,
    "torch.int": 3.0,
}
REFUSED = {
    "np.nan": "not a finite number",
    "torch.inf": "not a finite number",
    "list": "not a number",
    "np.vector": "not a number",
    "torch.vector": "not a number",
    "none": "not a number",
    "text": "not a number",
    "complex": "not a number",
    "huge": "not a finite number",
}


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "isolated"])
async def test_numpy_torch_and_bool_rewards_are_numbers(user_module: str, isolate: bool) -> None:
    """``pred == answer``, a numpy sum or a 0-d tensor is a score; garbage still fails clearly."""
    fn = load_reward_function(f"{user_module}:returns_kind")
    async with RewardScorer(fn, isolate=isolate, timeout_s=30.0) as scorer:
        kinds = [*ACCEPTED, *REFUSED]
        results = await scorer.score_many([("p", k, "bool") for k in kinds])
        single = await scorer.score("p", "np.float32", "a")
    got = dict(zip(kinds, results))
    for kind, score in ACCEPTED.items():
        r = got[kind]
        assert not r.failed and r.error is None, (kind, r.error)
        assert r.score == score and type(r.score) is float, (kind, r.score)
    for kind, message in REFUSED.items():
        r = got[kind]
        assert r.failed and r.score == 0.0, kind
        assert message in (r.error or ""), (kind, r.error)
    assert single.score == 0.5 and not single.failed
