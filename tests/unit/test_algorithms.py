"""Hand-computed checks of the advantage estimators and losses in asyncflow.algorithms.

Every expected number below was worked out by hand from the formulas in the docstrings.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.algorithms import (
    PolicyLossConfig,
    PolicyObjective,
    ValueObjective,
    aggregate,
    broadcast_to_tokens,
    final_token_rewards,
    gae_advantages,
    grpo_advantages,
    importance_weights,
    kl_penalty,
    masked_whiten,
    policy_loss,
    value_loss,
)
from asyncflow.engines.protocols import LossContext, TrainBatch

torch.set_num_threads(1)
LN = math.log


def close(actual: torch.Tensor | float, expected: list | float, atol: float = 1e-5) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.tensor(expected, dtype=torch.float32),
        atol=atol,
        rtol=0,
    )


# --- GRPO ----------------------------------------------------------------------------------


def test_grpo_normalised_by_std() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    # group 0: mean .5, unbiased std sqrt(1/3) = .57735 -> +-.5 / .57735 = +-.866025
    # group 1: zero variance -> 0; group 2: mean .75, std sqrt(6.75 / 3) = 1.5
    close(
        grpo_advantages(rewards, eps=0.0),
        [[0.866025, -0.866025, -0.866025, 0.866025], [0, 0, 0, 0], [-0.5, -0.5, -0.5, 1.5]],
    )


def test_grpo_without_std_and_degenerate_groups() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    close(
        grpo_advantages(rewards, normalize_std=False),
        [[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25], [0, 0, 0, 0]],
    )
    close(grpo_advantages(torch.tensor([[3.0], [1.0]])), [[0.0], [0.0]])
    assert not torch.isnan(grpo_advantages(torch.full((2, 3), 7.0))).any()
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(4))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-10, 10, allow_nan=False), min_size=4, max_size=4),
        min_size=1,
        max_size=5,
    ),
    st.floats(-5, 5),
    st.floats(0.5, 4),
)
def test_grpo_properties(rows: list[list[float]], shift: float, scale: float) -> None:
    rewards = torch.tensor(rows, dtype=torch.float64).float()
    adv = grpo_advantages(rewards, eps=0.0)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(len(rows)), atol=1e-4, rtol=0)
    varied = rewards.std(dim=1) > 1e-3
    if varied.any():
        std = adv[varied].std(dim=1)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-3, rtol=0)
        moved = grpo_advantages(rewards * scale + shift, eps=0.0)
        torch.testing.assert_close(moved[varied], adv[varied], atol=1e-3, rtol=0)


def test_broadcast_and_final_token_rewards() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    close(
        broadcast_to_tokens(torch.tensor([2.0, 3.0, -1.0]), mask),
        [[0, 2, 2, 0], [0, 0, 0, 0], [-1, -1, -1, -1]],
    )
    close(
        final_token_rewards(torch.tensor([2.0, 3.0, 4.0]), mask),
        [[0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 0, 4]],
    )


# --- GAE -----------------------------------------------------------------------------------


def test_gae_skips_prompt_and_right_padding() -> None:
    # position 0 is prompt, 4 is padding; score 1 lands on position 3; gamma .9, lam .8
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])
    adv, ret = gae_advantages(torch.tensor([1.0]), values, mask, gamma=0.9, lam=0.8)
    # t=3: 1 - .7 = .3
    # t=2: delta = .9*.7 - .6 = .03; A = .03 + .72*.3 = .246
    # t=1: delta = .9*.6 - .5 = .04; A = .04 + .72*.246 = .21712
    close(adv, [[0.0, 0.21712, 0.246, 0.3, 0.0]])
    close(ret, [[0.0, 0.71712, 0.846, 1.0, 0.0]])


def test_gae_per_token_rewards_monte_carlo_limit() -> None:
    # gamma = lam = 1: advantage = sum of future rewards - value
    rewards = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.3, 0.4], [0.1, 0.2, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[1.3, 1.2, 0.6], [0.9, -0.2, 0.0]])
    close(ret, [[1.5, 1.5, 1.0], [1.0, 0.0, 0.0]])


def test_masked_whiten() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, variance 2/3 -> +-1 / .816497 = +-1.224745
    close(masked_whiten(values, mask, eps=0.0), [[-1.224745, 0.0, 1.224745, 0.0]])
    close(masked_whiten(values, mask, shift_mean=False, eps=0.0), [[0.775255, 2.0, 3.224745, 0]])


# --- policy loss ---------------------------------------------------------------------------

# ratios 1.5, 0.5, 1.1 against old log-probs 0; advantages 1, -1, 2; clip .2
LOGP = [LN(1.5), LN(0.5), LN(1.1)]
ADV = [1.0, -1.0, 2.0]


def _pg(cfg: PolicyLossConfig, behaviour: list[float] | None = None, ref: bool = False):
    logp = torch.tensor([LOGP], requires_grad=True)
    loss, metrics = policy_loss(
        logp,
        torch.zeros(1, 3),
        torch.tensor([ADV]),
        torch.ones(1, 3),
        cfg,
        behaviour_logprobs=None if behaviour is None else torch.tensor([behaviour]),
        ref_logprobs=torch.zeros(1, 3) if ref else None,
    )
    return logp, loss, metrics


def test_ppo_clipped_loss_and_gradient() -> None:
    logp, loss, metrics = _pg(PolicyLossConfig(importance_mode="none"))
    # per token: max(-1.5, -1.2) = -1.2 (clipped), max(.5, .8) = .8 (clipped), -2.2
    close(loss.detach(), (-1.2 + 0.8 - 2.2) / 3)
    assert metrics["clip_frac"] == pytest.approx(2 / 3)
    assert metrics["pg_loss"] == pytest.approx(-2.6 / 3, abs=1e-6)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1) / 3, abs=1e-6)
    loss.backward()
    # clipped tokens give no gradient; the third gives -A * r / 3 = -2.2 / 3
    assert logp.grad is not None
    close(logp.grad, [[0.0, 0.0, -2.2 / 3]])


def test_dual_clip_caps_negative_advantage_loss() -> None:
    logp = torch.tensor([[LN(5.0)]])
    cfg = PolicyLossConfig(importance_mode="none", dual_clip=3.0)
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), cfg)
    close(loss, 3.0)  # max(5, 1.2) = 5, capped at 3 * |A|


def test_truncated_importance_sampling() -> None:
    # behaviour log-probs ln .25, ln 2, 0 -> w = exp(0 - b) = 4, .5, 1 -> truncated at 2
    behaviour = [LN(0.25), LN(2.0), 0.0]
    _, loss, m = _pg(PolicyLossConfig(importance_mode="truncate", importance_cap=2.0), behaviour)
    close(loss.detach(), (2 * -1.2 + 0.5 * 0.8 + 1 * -2.2) / 3)  # -1.4
    assert m["tis_weight_mean"] == pytest.approx(3.5 / 3, abs=1e-6)
    assert m["tis_weight_max"] == pytest.approx(4.0, abs=1e-5)
    assert m["tis_weight_min"] == pytest.approx(0.5, abs=1e-6)
    assert m["tis_truncated_frac"] == pytest.approx(1 / 3)


def test_masked_importance_sampling_rejects_over_cap_tokens() -> None:
    behaviour = [LN(0.25), LN(2.0), 0.0]
    _, loss, _ = _pg(PolicyLossConfig(importance_mode="mask", importance_cap=2.0), behaviour)
    close(loss.detach(), (0.0 + 0.5 * 0.8 - 2.2) / 3)  # -0.6
    weights, raw = importance_weights(
        torch.zeros(1, 3), torch.tensor([behaviour]), mode="mask", cap=2.0
    )
    close(weights, [[0.0, 0.5, 1.0]])
    close(raw, [[4.0, 0.5, 1.0]])


def test_kl_estimators() -> None:
    logp = torch.tensor([LOGP])
    ref = torch.zeros(1, 3)
    # d = ln 1.5, ln .5, ln 1.1 = .405465, -.693147, .095310
    close(kl_penalty(logp, ref, "k1"), [[0.405465, -0.693147, 0.095310]])
    close(kl_penalty(logp, ref, "k2"), [[0.082201, 0.240227, 0.004542]])
    # k3 = exp(-d) + d - 1 = .666667 + .405465 - 1, 2 - .693147 - 1, .909091 + .095310 - 1
    close(kl_penalty(logp, ref, "k3"), [[0.072132, 0.306853, 0.004401]])


def test_kl_penalty_enters_loss() -> None:
    cfg = PolicyLossConfig(importance_mode="none", kl_coef=0.1, kl_estimator="k3")
    _, loss, m = _pg(cfg, ref=True)
    k3_mean = (0.072132 + 0.306853 + 0.004401) / 3
    close(loss.detach(), -2.6 / 3 + 0.1 * k3_mean)
    assert m["kl_loss"] == pytest.approx(k3_mean, abs=1e-5)


def test_entropy_bonus_and_behaviour_kl_metric() -> None:
    logp = torch.tensor([[LN(0.5)]])
    entropy = torch.tensor([[0.7]])
    cfg = PolicyLossConfig(importance_mode="none", entropy_coef=0.5)
    loss, m = policy_loss(logp, logp, torch.tensor([[1.0]]), torch.ones(1, 1), cfg, entropy=entropy)
    close(loss, -1.0 - 0.5 * 0.7)
    assert m["entropy"] == pytest.approx(0.7)
    # behaviour = current -> KL 0; behaviour ln .25 vs current ln .5: d = ln .5, k3 = 2 + ln .5 - 1
    assert m["approx_kl_behaviour"] == pytest.approx(0.0)
    _, m2 = policy_loss(
        logp, logp, torch.ones(1, 1), torch.ones(1, 1), cfg, torch.tensor([[LN(0.25)]])
    )
    assert m2["approx_kl_behaviour"] == pytest.approx(1.0 + LN(0.5), abs=1e-6)


def test_aggregation_modes() -> None:
    per_token = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(aggregate(per_token, mask, "token-mean"), 7.0 / 3)
    close(aggregate(per_token, mask, "seq-mean-token-mean"), (1.5 + 4.0) / 2)
    close(aggregate(per_token, mask, "token-mean", global_tokens=7.0), 1.0)
    close(aggregate(per_token, mask, "seq-mean-token-mean", global_sequences=11), 0.5)


def test_value_loss_clipping() -> None:
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    old, returns = torch.tensor([[0.5, 2.1]]), torch.tensor([[2.0, 1.0]])
    # token 0: V_clip = .7, max((1-2)^2, (.7-2)^2) = 1.69; token 1: V_clip = V, 1
    loss, m = value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    close(loss.detach(), (0.5 * 1.69 + 0.5 * 1.0) / 2)
    assert m["vf_clip_frac"] == pytest.approx(0.5)
    loss.backward()
    assert values.grad is not None
    close(values.grad, [[0.0, 0.5]])  # clipped token has no gradient; (2 - 1) / 2
    plain, _ = value_loss(values, old, returns, torch.ones(1, 2), clip_range=None)
    close(plain.detach(), 0.5)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_accumulation_equals_full_batch_gradient(aggregation: str) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, length = 6, 7
    logp = -torch.rand(rows, length, generator=gen) * 2
    old = logp + 0.3 * torch.randn(rows, length, generator=gen)
    behaviour = old + 0.5 * torch.randn(rows, length, generator=gen)
    ref = old + 0.2 * torch.randn(rows, length, generator=gen)
    adv = torch.randn(rows, length, generator=gen)
    entropy = torch.rand(rows, length, generator=gen)
    mask = (torch.rand(rows, length, generator=gen) > 0.3).float()
    mask[2] = 0.0  # a row with no loss tokens
    cfg = PolicyLossConfig(kl_coef=0.05, entropy_coef=0.01, aggregation=aggregation)  # type: ignore[arg-type]

    def grad_of(slices: list[slice]) -> torch.Tensor:
        param = logp.clone().requires_grad_(True)
        tokens = float(mask.sum())
        seqs = int((mask.sum(1) > 0).sum())
        for s in slices:
            loss, _ = policy_loss(
                param[s], old[s], adv[s], mask[s], cfg, behaviour[s], ref[s], entropy[s],
                global_tokens=tokens, global_sequences=seqs,
            )  # fmt: skip
            loss.backward()
        assert param.grad is not None
        return param.grad

    full = grad_of([slice(0, rows)])
    split = grad_of([slice(0, 2), slice(2, 3), slice(3, 6)])
    torch.testing.assert_close(split, full, atol=1e-7, rtol=1e-6)
    assert full.abs().sum() > 0


# --- objectives ----------------------------------------------------------------------------


def test_policy_objective_reads_columns() -> None:
    batch = TrainBatch(
        input_ids=torch.zeros(1, 4, dtype=torch.long),
        attention_mask=torch.ones(1, 4, dtype=torch.long),
        loss_mask=torch.tensor([[0.0, 1.0, 1.0, 1.0]]),
        tensors={
            "advantages": torch.tensor([[0.0, *ADV]]),
            "rollout_logprobs": torch.tensor([[0.0, LN(0.25), LN(2.0), 0.0]]),
            "old_logprobs": torch.zeros(1, 4),
        },
    )
    objective = PolicyObjective(PolicyLossConfig(importance_cap=2.0), report_entropy=False)
    assert not objective.needs_entropy
    ctx = LossContext(global_tokens=6.0, global_sequences=2)
    loss, _ = objective({"logprobs": torch.tensor([[0.0, *LOGP]])}, batch, ctx)
    close(loss, -4.2 / 6)  # the TIS case above, divided by 6 global tokens instead of 3
    bare = TrainBatch(batch.input_ids, batch.attention_mask, batch.loss_mask)
    with pytest.raises(ValueError, match="advantages"):
        objective({"logprobs": torch.zeros(1, 4)}, bare, ctx)


def test_value_objective() -> None:
    batch = TrainBatch(
        input_ids=torch.zeros(1, 2, dtype=torch.long),
        attention_mask=torch.ones(1, 2, dtype=torch.long),
        loss_mask=torch.ones(1, 2),
        tensors={"returns": torch.tensor([[2.0, 1.0]]), "values": torch.tensor([[0.5, 2.1]])},
    )
    ctx = LossContext(global_tokens=2.0, global_sequences=1)
    loss, m = ValueObjective(clip_range=0.2)({"values": torch.tensor([[1.0, 2.0]])}, batch, ctx)
    close(loss, 0.6725)
    assert m["vf_clip_frac"] == pytest.approx(0.5)


def test_grpo_subnormal_spread_is_a_flat_group() -> None:
    """Rewards that differ only by a subnormal float32 (hypothesis found [0, 0, 0, 1.4e-45]):
    the group is flat -- all advantages 0, summing to 0 -- not 1 for the odd one out."""
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.401298464324817e-45]])
    close(grpo_advantages(rewards, eps=0.0), [[0.0, 0.0, 0.0, 0.0]])
