"""The math verifier: answer extraction, normalisation and exact comparison."""

import pytest

from asyncflow.rewards.math import extract_answer, normalize_answer, verify


@pytest.mark.parametrize(
    ("response", "answer", "score"),
    [
        ("13,12,10>1023", "1023", 1.0),  # built-in task format
        ("13,12,10>1024", "1023", 0.0),  # wrong answer
        ("13,12,10>1023 ", "1023", 1.0),
        ("13,12,10", "1023", 0.0),  # no answer part: last number is 10
        ("", "1023", 0.0),  # empty
        ("13,12,>", "1023", 0.0),  # malformed, no answer
        ("so the answer is \\boxed{1,023}.", "1023", 1.0),
        ("\\boxed{42} then \\boxed{43}", "43", 1.0),  # last boxed wins
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # nested braces, non-numeric
        ("\\boxed{42", "42", 1.0),  # unclosed box falls back to the last number
        ("The total is 17 apples, or 17.0", "17", 1.0),
        ("+5", "5", 1.0),
        ("5.50", "5.5", 1.0),
        ("-0", "0", 1.0),
        ("-3", "3", 0.0),
        ("3 > 2, so the answer is 7", "7", 1.0),  # '>' text is not a number: last number
        ("no digits here", "1", 0.0),
        ("1,234,567", "1234567", 1.0),
    ],
)
def test_verify_table(response: str, answer: str, score: float) -> None:
    assert verify(response, answer) == score


@pytest.mark.parametrize(
    ("response", "answer", "score"),
    [
        ("13,12,10>1023", "1023", 1.0),
        (" 8,14,8>848\n", "848", 1.0),
        ("13,12,10>1023>", "1023", 0.0),  # extra text after the answer
        ("13,12,10>1023,5", "1023", 0.0),
        ("the answer is 1023", "1023", 0.0),  # not the task format
        ("\\boxed{1023}", "1023", 0.0),
    ],
)
def test_verify_strict_task_format(response: str, answer: str, score: float) -> None:
    assert verify(response, answer, strict=True) == score


def test_normalize_answer() -> None:
    assert normalize_answer(" +1,023.000 ") == "1023"
    assert normalize_answer("007") == "7"
    assert normalize_answer("-0.0") == "0"
    assert normalize_answer("x + 1") == "x + 1"
    assert extract_answer("nothing") is None


def test_reward_modules_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, asyncflow.rewards.math, asyncflow.rewards.functions; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
