"""The transformers engine's top-k / top-p mask agrees with vLLM's: top-p is taken over the
probabilities renormalised to the top-k set."""

from __future__ import annotations

import math

import torch

from asyncflow.engines.hf_engine import _truncate
from asyncflow.engines.protocols import SamplingConfig


def kept(probs: list[float], **sampling: float) -> list[int]:
    logits = torch.tensor([[math.log(p) for p in probs]])
    out = _truncate(logits, [SamplingConfig(temperature=1.0, **sampling)])  # type: ignore[arg-type]
    return [i for i, v in enumerate(out[0].tolist()) if v != float("-inf")]


def test_top_p_over_the_top_k_set() -> None:
    # top-2 renormalised: 0.625, 0.375; top_p 0.6 keeps the first only (0.5 + 0.3 before)
    assert kept([0.5, 0.3, 0.2], top_k=2, top_p=0.6) == [0]
    assert kept([0.5, 0.3, 0.2], top_p=0.6) == [0, 1]  # no top-k: 0.5 < 0.6, so two
    assert kept([0.5, 0.3, 0.2], top_k=2) == [0, 1]
    assert kept([0.1, 0.6, 0.3], top_k=1, top_p=0.01) == [1]  # always at least one token
    assert kept([0.5, 0.3, 0.2]) == [0, 1, 2]
