"""The built-in verifier for math-style answers: extract the final answer, normalise, compare.

This module owns answer extraction and normalisation; it is pure Python (no torch) and cheap
enough to run in-process inside the reward worker.

Extraction, first rule that applies:

1. ``\\boxed{...}``: the content of the last ``\\boxed{}`` (nested braces allowed);
2. the built-in task's format ``13,12,10>1023``: the text after the last ``>``, when that text
   (whitespace and one trailing ``.`` aside) is a single number;
3. otherwise the last number in the text.

With ``strict=True`` only rule 2 applies and the whole response must be the task format
(column sums, ``>``, answer): the reward for the built-in task.

Normalisation of numbers: surrounding whitespace, a leading ``+``, thousands commas
(``1,023``), leading zeros and a fractional part of zeros (``5.0``, ``5.00``) are removed;
``-0`` is ``0``. A non-numeric boxed answer is compared after stripping whitespace.
The comparison of normalised strings is exact: the score is 1.0 or 0.0.
"""

from __future__ import annotations

import re

_NUMBER = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_FULL_NUMBER_RE = re.compile(rf"\s*({_NUMBER})\.?\s*")
_TASK_RE = re.compile(r"\s*(?:\d+,)*\d+>(\d+)\s*")
_BOXED = "\\boxed{"


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed: malformed


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final answer in ``text`` (not yet normalised), or ``None`` if there is none."""
    if strict:
        match = _TASK_RE.fullmatch(text)
        return match.group(1) if match else None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if ">" in text:
        match = _FULL_NUMBER_RE.fullmatch(text[text.rfind(">") + 1 :])
        if match:
            return match.group(1)
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer: numbers as described in the module docstring."""
    text = answer.strip()
    if not _NUMBER_RE.fullmatch(text):
        return text
    sign = "-" if text.startswith("-") else ""
    text = text.lstrip("+-").replace(",", "")
    whole, _, frac = text.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    body = f"{whole}.{frac}" if frac else whole
    return body if body == "0" else sign + body


def verify(response: str, answer: str, strict: bool = False) -> float:
    """1.0 if the final answer in ``response`` equals ``answer`` after normalisation, else 0.0."""
    found = extract_answer(response, strict=strict)
    if found is None:
        return 0.0
    return 1.0 if normalize_answer(found) == normalize_answer(answer) else 0.0


def math_reward(prompt: str, response: str, answer: str) -> float:
    """``RewardFunction``-shaped verifier for math answers (boxed, ``>`` or last number)."""
    return verify(response, answer)


def arithmetic_reward(prompt: str, response: str, answer: str) -> float:
    """``RewardFunction``-shaped reward of the built-in task: strict worked-sum format."""
    return verify(response, answer, strict=True)


__all__ = ["arithmetic_reward", "extract_answer", "math_reward", "normalize_answer", "verify"]
