"""The least-loaded choice of a worker for a stage's next batch (``controller/balance.py``)."""

from __future__ import annotations

import pytest

from asyncflow.controller.balance import LeastLoaded

W = ["rollout0", "rollout1"]


def test_batches_handed_out_back_to_back_alternate_between_idle_workers() -> None:
    """The rows count from the pick on: a step's batches are all handed out before any call
    starts, and counting them only once a call ran sent every one to the first worker."""
    lb = LeastLoaded()
    assert [lb.pick(W, 16) for _ in range(4)] == ["rollout0", "rollout1", "rollout0", "rollout1"]
    assert lb.load("rollout0") == lb.load("rollout1") == 32


def test_a_worker_still_busy_gets_the_next_batches_last() -> None:
    lb = LeastLoaded()
    assert lb.pick(W, 16) == "rollout0"
    assert lb.pick(W, 16) == "rollout1"
    lb.done("rollout1", 16, 0.1)  # rollout1 answered, rollout0 still generates
    assert [lb.pick(W, 16) for _ in range(2)] == ["rollout1", "rollout1"]
    assert lb.load("rollout0") == 16 and lb.load("rollout1") == 32


def test_between_equal_loads_the_faster_worker_per_row_wins() -> None:
    lb = LeastLoaded()
    for name, seconds in (("rollout0", 0.8), ("rollout1", 0.2)):
        lb.pick([name], 16)
        lb.done(name, 16, seconds)
    assert lb.pick(W, 16) == "rollout1"
    assert lb.pick(["rollout0"], 16) == "rollout0"  # only the ready ones are offered


def test_a_failed_call_frees_its_rows_without_counting_as_fast() -> None:
    lb = LeastLoaded()
    lb.pick(["a"], 2)
    lb.done("a", 2, 0.5)
    lb.pick(["b"], 2)
    lb.done("b", 2, None)  # failed
    assert lb.load("b") == 0
    # b has no measured speed: a worker not measured yet is tried first (0 s per row so far)
    assert lb.pick(["a", "b"], 2) == "b"


def test_no_worker_to_pick_from_is_an_error() -> None:
    with pytest.raises(ValueError, match="no worker"):
        LeastLoaded().pick([], 1)
