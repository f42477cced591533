"""Prompt dataset loaders: built-in task, JSON lines (good and bad rows), parquet."""

import subprocess
import sys
from pathlib import Path

import pytest

from asyncflow.tasks.datasets import (
    DatasetError,
    PromptRow,
    PromptSource,
    load_builtin,
    load_jsonl,
    load_parquet,
    load_prompts,
)

GOOD = b'{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": 4}\n\n'


def write(tmp_path: Path, data: bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_builtin_train_and_eval() -> None:
    train = load_builtin("train", size=100, seed=0)
    evals = load_builtin("eval", size=50, seed=0)
    assert len(train) == 100 and len(evals) == 50
    assert train[0].index == 0 and train[99].index == 99
    assert {r.prompt for r in train}.isdisjoint({r.prompt for r in evals})
    first = train[0]
    a, b = first.prompt.rstrip("=").split("+")
    assert first.answer == str(int(a) + int(b))
    with pytest.raises(ValueError, match="split"):
        load_builtin("test", size=10)  # type: ignore[arg-type]


def test_jsonl_good_rows(tmp_path: Path) -> None:
    source = load_prompts(write(tmp_path, GOOD))
    assert list(source) == [PromptRow("1+2=", "3", 0), PromptRow("2+2=", "4", 1)]
    assert source.skipped == []


def test_jsonl_custom_field_names(tmp_path: Path) -> None:
    path = write(tmp_path, b'{"question": "q?", "solution": "42"}\n')
    source = load_jsonl(path, prompt_field="question", answer_field="solution")
    assert source[0] == PromptRow("q?", "42", 0)
    with pytest.raises(DatasetError, match="missing field 'prompt'"):
        load_jsonl(path)


BAD_ROWS = [
    (b'{"answer": "3"}', "missing field 'prompt'"),
    (b'{"prompt": "1+2="}', "missing field 'answer'"),
    (b'{"prompt": 12, "answer": "3"}', "field 'prompt' must be a string, got int"),
    (b'{"prompt": "1+2=", "answer": [3]}', "field 'answer' must be a string, got list"),
    (b'{"prompt": "caf\xe9", "answer": "3"}', "not valid UTF-8"),
    (b'{"prompt": "   ", "answer": "3"}', "empty prompt"),
    (b'{"prompt": "' + b"9" * 50 + b'", "answer": "3"}', "prompt too long: 50 characters"),
    (b'{"prompt": "1+2=", "answer": "3"', "not valid JSON"),
    (b'["1+2=", "3"]', "expected a JSON object, got list"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_ROWS)
def test_jsonl_bad_row_errors_name_file_line_and_problem(
    tmp_path: Path, line: bytes, reason: str
) -> None:
    path = write(tmp_path, GOOD + line + b"\n")
    with pytest.raises(DatasetError, match=reason) as info:
        load_jsonl(path, max_prompt_chars=40)
    assert info.value.line == 4  # lines 1-2 good, line 3 blank
    assert str(info.value).startswith(f"{path}:4: ")


@pytest.mark.parametrize(("line", "reason"), BAD_ROWS)
def test_jsonl_skip_policy_records_bad_rows(tmp_path: Path, line: bytes, reason: str) -> None:
    path = write(tmp_path, GOOD + line + b"\n" + GOOD)
    source = load_jsonl(path, on_bad_row="skip", max_prompt_chars=40)
    assert len(source) == 4
    assert [r.index for r in source] == [0, 1, 2, 3]
    assert len(source.skipped) == 1
    assert source.skipped[0][0] == 4 and reason in source.skipped[0][1]


def test_token_limit(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(DatasetError, match="3 tokens > max_prompt_tokens=2"):
        load_jsonl(path, max_prompt_tokens=2, count_tokens=lambda s: len(s) - 1)
    with pytest.raises(ValueError, match="count_tokens"):
        load_jsonl(path, max_prompt_tokens=2)


def test_empty_datasets_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        load_jsonl(write(tmp_path, b""))
    with pytest.raises(ValueError, match="empty"):
        load_jsonl(write(tmp_path, b"\n  \n"))
    with pytest.raises(ValueError, match=r"empty \(all 1 rows were bad\)"):
        load_jsonl(write(tmp_path, b'{"answer": "1"}\n'), on_bad_row="skip")
    with pytest.raises(ValueError, match="empty"):
        PromptSource([], name="nothing")


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        load_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_prompts(write(tmp_path, GOOD, name="data.csv"))
    with pytest.raises(ValueError, match="on_bad_row"):
        load_jsonl(write(tmp_path, GOOD), on_bad_row="ignore")  # type: ignore[arg-type]


def test_parquet_without_pyarrow_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="pip install pyarrow"):
        load_prompts(tmp_path / "data.parquet")


def test_parquet_rows(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    table = pa.table({"prompt": ["1+2=", "", "3+3="], "answer": ["3", "0", "6"]})
    pq.write_table(table, path)
    with pytest.raises(DatasetError, match=r"data.parquet:2: empty prompt"):
        load_parquet(path)
    source = load_parquet(path, on_bad_row="skip")
    assert [r.prompt for r in source] == ["1+2=", "3+3="] and source.skipped[0][0] == 2
    with pytest.raises(DatasetError, match="missing column 'question'"):
        load_parquet(path, prompt_field="question")


def test_datasets_module_does_not_import_torch() -> None:
    code = "import sys, asyncflow.tasks.datasets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
