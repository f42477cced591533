"""The built-in arithmetic task: exact target format, determinism, train/eval disjointness."""

import re

from hypothesis import given
from hypothesis import strategies as st

from asyncflow.tasks.arithmetic import (
    eval_problems,
    is_eval_pair,
    make_problem,
    train_problems,
    train_stream,
    worked_sum,
)

TARGET_RE = re.compile(r"(\d{1,2},)*\d{1,2}>\d+")


def test_worked_sum_table() -> None:
    assert worked_sum(345, 678) == "13,12,10>1023"
    assert worked_sum(0, 0) == "0>0"
    assert worked_sum(5, 37) == "12,4>42"
    assert worked_sum(9999, 1) == "10,10,10,10>10000"
    assert worked_sum(1234, 4321) == "5,5,5,5>5555"


def test_problem_fields() -> None:
    p = make_problem(345, 678)
    assert (p.prompt, p.answer, p.target) == ("345+678=", "1023", "13,12,10>1023")


@given(st.integers(0, 9999), st.integers(0, 9999))
def test_target_reconstructs_answer(a: int, b: int) -> None:
    target = worked_sum(a, b)
    assert TARGET_RE.fullmatch(target)
    sums_text, answer = target.split(">")
    sums = [int(s) for s in sums_text.split(",")]
    assert len(sums) == max(len(str(a)), len(str(b)))
    digits = [s % 10 for s in sums]
    value = sum(d * 10**i for i, d in enumerate(digits)) + (sums[-1] // 10) * 10 ** len(sums)
    assert value == a + b == int(answer)


def test_streams_are_deterministic_in_seed() -> None:
    assert train_problems(50, seed=3) == train_problems(50, seed=3)
    assert train_problems(50, seed=3) != train_problems(50, seed=4)
    assert eval_problems(40, seed=0) == eval_problems(40, seed=0)
    stream = train_stream(3)
    assert [next(stream) for _ in range(50)] == train_problems(50, seed=3)


def test_eval_split_is_disjoint_from_training() -> None:
    evals = eval_problems(256, seed=0) + eval_problems(256, seed=1)
    eval_pairs = {(p.a, p.b) for p in evals}
    train_pairs = {(p.a, p.b) for s in (0, 1) for p in train_problems(3000, seed=s)}
    assert eval_pairs and train_pairs
    assert not eval_pairs & train_pairs
    assert all(is_eval_pair(a, b) for a, b in eval_pairs)
    assert len({(p.a, p.b) for p in eval_problems(256)}) == 256  # distinct


def test_operands_have_one_to_four_digits_of_each_length() -> None:
    problems = train_problems(2000, seed=0)
    lengths = {len(str(p.a)) for p in problems} | {len(str(p.b)) for p in problems}
    assert lengths == {1, 2, 3, 4}
    assert all(p.answer == str(p.a + p.b) and p.target.endswith(">" + p.answer) for p in problems)
