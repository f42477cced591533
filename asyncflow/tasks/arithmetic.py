"""The built-in verifiable task: addition of 1-4 digit numbers with a short worked sum.

This module owns the task's text format, its deterministic problem generator and the split
between training and held-out evaluation problems. It imports nothing heavy (no torch).

Format (exact, one line, no spaces)::

    prompt  = "<a>+<b>="                         e.g. "345+678="
    target  = "<s_0>,<s_1>,...,<s_{n-1}>><a+b>"  e.g. "13,12,10>1023"

``n = max(len(a), len(b))`` columns, the shorter operand padded with leading zeros. Column ``i``
counts from the right (units first); ``s_i = a_i + b_i + carry_i`` written in decimal (0..19)
without padding, where ``carry_0 = 0`` and ``carry_{i+1} = s_i // 10``. The column sums are
joined by ``,`` and followed by a single ``>`` and the decimal answer ``a + b`` (no separators).
The answer is therefore always the text after the last ``>``, which is what the verifier in
``asyncflow.rewards.math`` reads. The model ends the target with its end-of-sequence token.

Operands: the digit count of each operand is drawn uniformly from 1..4, then the number
uniformly among numbers with exactly that many digits (0..9 for one digit). A pair ``(a, b)``
belongs to the evaluation split iff a stable hash of ``"a+b"`` falls in the held-out bucket
(1/8 of all pairs), independent of any seed: every training stream, whatever its seed, is
disjoint from every evaluation list.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

MAX_DIGITS = 4
EVAL_BUCKETS = 8  # one bucket of this many is held out for evaluation
TASK_NAME = "arithmetic"


@dataclass(frozen=True, slots=True)
class Problem:
    """One addition problem with its prompt, final answer and full worked target."""

    a: int
    b: int
    prompt: str  # "345+678="
    answer: str  # "1023"
    target: str  # "13,12,10>1023"


def worked_sum(a: int, b: int) -> str:
    """The worked target for ``a + b``: column sums right to left with carries, ``>``, answer."""
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    da, db = str(a), str(b)
    width = max(len(da), len(db))
    da, db = da.zfill(width)[::-1], db.zfill(width)[::-1]
    carry = 0
    sums: list[str] = []
    for x, y in zip(da, db, strict=True):
        s = int(x) + int(y) + carry
        sums.append(str(s))
        carry = s // 10
    return ",".join(sums) + ">" + str(a + b)


def make_problem(a: int, b: int) -> Problem:
    """Build the problem record for ``a + b``."""
    return Problem(a=a, b=b, prompt=f"{a}+{b}=", answer=str(a + b), target=worked_sum(a, b))


def is_eval_pair(a: int, b: int) -> bool:
    """Whether ``(a, b)`` belongs to the held-out evaluation split (stable across runs)."""
    digest = hashlib.blake2b(f"{a}+{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % EVAL_BUCKETS == 0


def _draw_operand(rng: random.Random) -> int:
    digits = rng.randint(1, MAX_DIGITS)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _draw(rng: random.Random, want_eval: bool) -> Problem:
    while True:
        a, b = _draw_operand(rng), _draw_operand(rng)
        if is_eval_pair(a, b) == want_eval:
            return make_problem(a, b)


def train_stream(seed: int = 0) -> Iterator[Problem]:
    """An endless, deterministic stream of training problems (never an evaluation pair)."""
    rng = random.Random(f"{TASK_NAME}-train-{seed}")
    while True:
        yield _draw(rng, want_eval=False)


def train_problems(n: int, seed: int = 0) -> list[Problem]:
    """The first ``n`` problems of ``train_stream(seed)``."""
    stream = train_stream(seed)
    return [next(stream) for _ in range(n)]


def eval_problems(n: int = 256, seed: int = 0) -> list[Problem]:
    """``n`` distinct held-out evaluation problems, deterministic in ``seed``."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(f"{TASK_NAME}-eval-{seed}")
    seen: set[tuple[int, int]] = set()
    out: list[Problem] = []
    while len(out) < n:
        p = _draw(rng, want_eval=True)
        if (p.a, p.b) not in seen:
            seen.add((p.a, p.b))
            out.append(p)
    return out


__all__ = [
    "MAX_DIGITS",
    "Problem",
    "eval_problems",
    "is_eval_pair",
    "make_problem",
    "train_problems",
    "train_stream",
    "worked_sum",
]
