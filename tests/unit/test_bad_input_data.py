"""Bad config files and overrides, bad dataset rows: clear errors naming the key or the line, and
exact counts of what was skipped. (The basic cases live in test_config.py / test_datasets.py.)"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from asyncflow.config import ConfigError, load_config
from asyncflow.tasks.datasets import DatasetError, PromptRow, load_jsonl, load_prompts
from asyncflow.tasks.sources import eval_source, resolve_model, train_source


def config_file(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "run.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        ("actor:\n  lr: fast\n", ["actor.lr: Input should be a valid number", '"fast"']),
        ("rollout:\n  enginee: vllm\n", ["rollout.enginee: unknown key", "'engine'"]),
        ("optimizer:\n  lr: 1\n", ["optimizer: unknown key", "'actor'"]),
        ("algorithm: [1, 2]\n", ["algorithm: Input should be a valid dictionary"]),
        ("run:\n  seed: 1.5\n", ["run.seed: Input should be a valid integer"]),
        ("run:\n  seed: [1]\n", ["run.seed: Input should be a valid integer"]),
        ("run:\n  progress: maybe\n", ["run.progress: Input should be a valid boolean"]),
        ("model:\n  max_model_len: 4\n", ["model.max_model_len: Input should be greater"]),
        ("data:\n  on_bad_row: ignore\n", ["data.on_bad_row: Input should be 'error' or 'skip'"]),
        ("rollout:\n  urls: http://a:1\n", ["rollout.urls: Input should be a valid list"]),
        ("run:\n  1: x\n", ["run.1: Keys should be strings"]),
        ("run: null\n", ["run: Input should be a valid dictionary"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_file_mistakes_name_the_key(tmp_path: Path, text: str, messages: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(config_file(tmp_path, text))
    for m in messages:
        assert m in str(e.value)


def test_every_mistake_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = config_file(tmp_path, "actor:\n  lr: -1\n  lrr: 2\nrun:\n  seed: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = str(e.value).splitlines()
    assert lines[0] == "invalid config:"
    assert {line.split(":")[0].strip() for line in lines[1:]} == {"actor.lr", "actor.lrr",
                                                                  "run.seed"}  # fmt: skip


@pytest.mark.parametrize(
    "data",
    [
        b"run:\n  name: caf\xe9\n",  # latin-1, not UTF-8
        b"\xff\xfe" + "run: {}\n".encode("utf-16-le"),  # UTF-16 with a BOM
        b"run:\n  name: \x80\x81\n",
    ],
)
def test_non_utf8_files_name_the_file_and_the_encoding(tmp_path: Path, data: bytes) -> None:
    path = config_file(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "utf-8" in str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        "run: [unclosed\n",
        "run:\n\tname: tab\n",  # YAML forbids tabs for indentation
        "run:\n  name: 'x\n",
        "a: b: c\n",
    ],
)
def test_malformed_yaml_is_a_config_error_with_position(tmp_path: Path, text: str) -> None:
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError, match="is not valid YAML") as e:
        load_config(path)
    assert "line" in str(e.value)


def test_yaml_tags_never_construct_python_objects(tmp_path: Path) -> None:
    """safe_load only: a ``!!python/object`` tag is an error, not code that runs."""
    marker = tmp_path / "ran"
    text = f"run:\n  name: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(config_file(tmp_path, text))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([".lr=1"], "empty key segment"),
        (["actor..lr=1"], "empty key segment"),
        (["run.name=[unclosed"], "value is not valid YAML"),
        (["run.seed=1.5"], "run.seed: Input should be a valid integer"),
        (["run.seed=[1, 2]"], "run.seed: Input should be a valid integer"),
        (["run.seed="], "run.seed: Input should be a valid integer"),
        (["foo.bar=1"], "foo: unknown key"),
        (["rollout.vllm.dtypee=float16"], "rollout.vllm.dtypee: unknown key"),
        (["algorithm.name=dpo"], "algorithm.name: Input should be 'grpo' or 'ppo'"),
        (["sync.port=-1"], "sync.port: Input should be greater than or equal to 0"),
    ],
)
def test_override_mistakes_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_override_into_a_value_of_the_file_names_the_key(tmp_path: Path) -> None:
    path = config_file(tmp_path, "actor: 3\n")
    with pytest.raises(ConfigError, match="actor is a value, not a section"):
        load_config(path, ["actor.lr=1"])


def test_a_bad_file_or_override_leaves_the_file_untouched(tmp_path: Path) -> None:
    text = "actor:\n  lr: 0.001\n"
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError):
        load_config(path, ["actor.lr=fast"])
    assert path.read_text(encoding="utf-8") == text
    assert load_config(path).actor.lr == 0.001


# ---------------------------------------------------------------------------- datasets

GOOD = '{"prompt": "1+2=", "answer": "3"}'


def dataset(tmp_path: Path, lines: Sequence[bytes | str], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(x.encode() if isinstance(x, str) else x for x in lines) + b"\n")
    return path


MIXED: list[bytes | str] = [
    GOOD,  # 1
    '{"prompt": null, "answer": "1"}',  # 2 wrong type
    '{"prompt": "2+2=", "answer": true}',  # 3 bool is not an answer
    "",  # 4 blank: not a row
    b'{"prompt": "\xc3\x28", "answer": "1"}',  # 5 invalid UTF-8
    '{"prompt": "3+3=", "answer": 6.5}',  # 6 numbers are fine answers
    '{"question": "4+4=", "answer": "8"}',  # 7 missing field
    '{"prompt": "' + "x" * 100 + '", "answer": "1"}',  # 8 too long
    "42",  # 9 not an object
    '{"prompt": "5+5=", "answer": {"v": 10}}',  # 10 wrong type
    GOOD,  # 11
]


def test_skip_counts_every_bad_row_with_its_line_and_reason(tmp_path: Path) -> None:
    source = load_jsonl(dataset(tmp_path, MIXED), on_bad_row="skip", max_prompt_chars=50)
    assert [r.prompt for r in source] == ["1+2=", "3+3=", "1+2="]
    assert [r.answer for r in source] == ["3", "6.5", "3"]
    assert [r.index for r in source] == [0, 1, 2]  # indices stay dense after skips
    assert [line for line, _ in source.skipped] == [2, 3, 5, 7, 8, 9, 10]
    reasons = dict(source.skipped)
    assert "field 'prompt' must be a string, got NoneType" in reasons[2]
    assert "field 'answer' must be a string, got bool" in reasons[3]
    assert "not valid UTF-8" in reasons[5]
    assert "missing field 'prompt'" in reasons[7]
    assert "prompt too long: 100 characters > max_prompt_chars=50" in reasons[8]
    assert "expected a JSON object, got int" in reasons[9]
    assert "field 'answer' must be a string, got dict" in reasons[10]
    non_blank = sum(1 for x in MIXED if x)
    assert len(source) + len(source.skipped) == non_blank
    assert "skipped=7" in repr(source)


def test_error_policy_stops_at_the_first_bad_line(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as e:
        load_jsonl(dataset(tmp_path, MIXED), max_prompt_chars=50)
    assert e.value.line == 2 and "NoneType" in e.value.reason


def test_prompts_over_the_engine_token_limit_are_skipped_and_counted(tmp_path: Path) -> None:
    """The engine's limit arrives as ``max_prompt_tokens`` with a tokenizer's counter."""
    lines = [f'{{"prompt": "{"a " * n}", "answer": "1"}}' for n in (1, 4, 8, 3, 9)]
    path = dataset(tmp_path, lines)
    source = load_jsonl(
        path, on_bad_row="skip", max_prompt_tokens=4, count_tokens=lambda s: len(s.split())
    )
    assert [len(r.prompt.split()) for r in source] == [1, 4, 3]
    assert [line for line, _ in source.skipped] == [3, 5]
    assert "prompt too long: 8 tokens > max_prompt_tokens=4" in source.skipped[0][1]
    with pytest.raises(DatasetError, match=r":3: prompt too long: 8 tokens"):
        load_jsonl(path, max_prompt_tokens=4, count_tokens=lambda s: len(s.split()))


def test_a_file_in_another_encoding_is_all_bad_rows_then_empty(tmp_path: Path) -> None:
    rows = [f'{{"prompt": "caf\u00e9 {i}", "answer": "1"}}'.encode("latin-1") for i in range(3)]
    path = dataset(tmp_path, rows)
    with pytest.raises(DatasetError, match=r"d.jsonl:1: not valid UTF-8 \(invalid"):
        load_jsonl(path)
    with pytest.raises(ValueError, match=r"the dataset is empty \(all 3 rows were bad\)"):
        load_jsonl(path, on_bad_row="skip")


def test_utf16_file_is_refused_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes((GOOD + "\n").encode("utf-16"))
    with pytest.raises(DatasetError, match="not valid UTF-8"):
        load_jsonl(path)


def test_utf8_bom_is_reported_on_line_one(tmp_path: Path) -> None:
    path = dataset(tmp_path, [b"\xef\xbb\xbf" + GOOD.encode(), GOOD])
    with pytest.raises(DatasetError, match=r":1: not valid JSON \(Unexpected UTF-8 BOM"):
        load_jsonl(path)
    source = load_jsonl(path, on_bad_row="skip")
    assert len(source) == 1 and source.skipped[0][0] == 1


def test_crlf_and_blank_lines_are_not_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"{GOOD}\r\n\r\n   \n{GOOD}\r\n".encode())
    source = load_jsonl(path)
    assert list(source) == [PromptRow("1+2=", "3", 0), PromptRow("1+2=", "3", 1)]
    assert source.skipped == []


@pytest.mark.parametrize("content", [b"", b"\n\n", b"   \r\n\t\n"])
def test_empty_dataset_is_a_clear_error_before_any_row(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    for policy in ("error", "skip"):
        with pytest.raises(DatasetError, match=r"d.jsonl: the dataset is empty \(no rows\)"):
            load_prompts(path, on_bad_row=policy)  # type: ignore[arg-type]


def test_custom_field_names_in_errors(tmp_path: Path) -> None:
    path = dataset(tmp_path, ['{"q": 5, "a": "1"}', '{"q": "ok", "a": "1"}'])
    source = load_jsonl(path, on_bad_row="skip", prompt_field="q", answer_field="a")
    assert len(source) == 1
    assert source.skipped == [(1, "field 'q' must be a string, got int")]


def test_truncated_last_line_is_one_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes((GOOD + "\n" + GOOD[:-7]).encode())
    source = load_jsonl(path, on_bad_row="skip")
    assert len(source) == 1
    assert source.skipped[0][0] == 2 and "not valid JSON" in source.skipped[0][1]


# ---------------------------------------------------------------------------- known gaps
# Found while writing these tests; the fixes belong to asyncflow/tasks/datasets.py and
# asyncflow/config.py (not this file's owner). strict=True: these fail once fixed, so the marker
# comes off then.


def test_lone_surrogate_escape_is_not_text(tmp_path: Path) -> None:
    """``"\\ud800"`` parses to a str that cannot be encoded to UTF-8 (a tokenizer would fail)."""
    path = dataset(tmp_path, ['{"prompt": "a\\ud800b", "answer": "1"}', GOOD])
    source = load_jsonl(path, on_bad_row="skip")
    assert [line for line, _ in source.skipped] == [1]


def test_nan_answer_is_a_bad_row(tmp_path: Path) -> None:
    path = dataset(tmp_path, ['{"prompt": "1+1=", "answer": NaN}', GOOD])
    source = load_jsonl(path, on_bad_row="skip")
    assert [line for line, _ in source.skipped] == [1]


def test_duplicate_keys_in_a_file_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="actor"):
        load_config(config_file(tmp_path, "actor:\n  lr: 0.1\nactor:\n  lr: 0.2\n"))


# ---------------------------------------------------------------------------- the eval set


def test_eval_file_skips_the_rows_training_skips(tmp_path: Path) -> None:
    """The eval set gets the training rows' rules (fields, character and token limits): an
    eval prompt too long for the engine is skipped and counted, not sent to fail the run."""
    model_dir = str(resolve_model("builtin:tiny-adder"))
    rows = [
        {"q": "1+2=", "a": "3"},  # 1
        {"q": "1+2=" * 20, "a": "1"},  # 2 too many tokens (few characters)
        {"prompt": "2+2=", "a": "4"},  # 3 not the configured field
        {"q": "x" * 300, "a": "1"},  # 4 too many characters
        {"q": "3+4=", "a": 7},  # 5
    ]
    path = dataset(tmp_path, [json.dumps(r) for r in rows])
    data = {
        "source": str(path),
        "prompt_field": "q",
        "answer_field": "a",
        "max_prompt_chars": 200,
        "max_prompt_tokens": 16,
    }
    train = train_source(data, 0, model_dir)
    evals = eval_source(data, {"source": str(path), "size": 256}, 0, model_dir)
    assert [(r.prompt, r.answer, r.index) for r in evals] == [("1+2=", "3", 0), ("3+4=", "7", 1)]
    assert evals.skipped == train.skipped
    assert [line for line, _ in evals.skipped] == [2, 3, 4]
    reasons = dict(evals.skipped)
    assert "tokens > max_prompt_tokens=16" in reasons[2]
    assert "missing field 'q'" in reasons[3]
    assert "300 characters > max_prompt_chars=200" in reasons[4]
    with pytest.raises(DatasetError, match=r":2: prompt too long: \d+ tokens"):
        eval_source({**data, "on_bad_row": "error"}, {"source": str(path)}, 0, model_dir)


def test_eval_size_takes_the_first_rows_of_a_file_as_of_the_builtin_split(tmp_path: Path) -> None:
    path = dataset(tmp_path, [f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}' for i in range(5)])
    first = eval_source({}, {"source": str(path), "size": 2}, 0)
    assert [(r.prompt, r.index) for r in first] == [("0+1=", 0), ("1+1=", 1)]
    assert len(eval_source({}, {"source": str(path), "size": 10}, 0)) == 5  # all, if fewer
    builtin = eval_source({}, {"size": 7}, 0)
    assert len(builtin) == 7


def test_rollout_worker_evaluates_only_prompts_that_fit_the_engine(tmp_path: Path) -> None:
    """With the settings the controller derives: an eval prompt of ``max_model_len`` tokens or
    more (vLLM refuses it, ending the run at its first evaluation) is left out and counted."""
    from asyncflow.roles.settings import role_settings
    from asyncflow.workers.rollout import RolloutRole

    train = dataset(tmp_path, ['{"prompt": "1+2=", "answer": "3"}'], "train.jsonl")
    rows = ['{"prompt": "2+2=", "answer": "4"}', json.dumps({"prompt": "9+" * 40, "answer": "1"})]
    evals = dataset(tmp_path, [*rows, '{"prompt": "3+3=", "answer": "6"}'], "eval.jsonl")
    cfg = load_config(
        None,
        [
            f"data.source={train}",
            f"eval.source={evals}",
            "eval.size=5",
            "model.max_model_len=64",
            "rollout.max_new_tokens=16",
            "rollout.engine=transformers",
        ],
    )
    role = RolloutRole(role_settings(cfg)["rollout"])
    assert [r.prompt for r in role.eval] == ["2+2=", "3+3="]
    assert [line for line, _ in role.eval.skipped] == [2]
    assert "tokens > max_prompt_tokens=48" in role.eval.skipped[0][1]
