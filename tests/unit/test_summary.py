"""The run summary counts each step once, also after a resume redid some steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncflow.config import load_config
from asyncflow.controller.controller import Controller
from asyncflow.controller.records import summarize


def record(step: int, samples: int, time_s: float) -> dict[str, object]:
    return {
        "step": step,
        "samples": samples,
        "response_tokens": 10 * samples,
        "step_time_s": time_s,
        "reward_mean": step / 10,
        "staleness_max": 1,
        "reward_failures": 0,
    }


def test_redone_steps_count_once_as_last_trained(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r"])
    cfg.run_dir.mkdir(parents=True)
    lines = [
        {"event": "eval", "step": 0, "eval_accuracy": 0.25},
        *(record(s, 64, 1.0) for s in range(4)),  # the dead run got to step 3
        {"event": "resumed", "step": 2},  # its last checkpoint was after step 1
        *(record(s, 64, 0.5) for s in (2, 3, 4)),
        {"event": "eval", "step": 5, "eval_accuracy": 0.5},
    ]
    (cfg.run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = summarize(cfg.run_dir)
    assert out["steps"] == 5
    # steps 0-1 from the first run (1 s each), 2-4 as redone (0.5 s each)
    assert out["train_time_s"] == pytest.approx(3.5)
    assert out["samples_per_s"] == pytest.approx(5 * 64 / 3.5)
    assert out["reward_last"] == pytest.approx(0.4)
    assert (out["eval_accuracy_start"], out["eval_accuracy_end"]) == (0.25, 0.5)


def test_first_and_last_reward_are_means_over_a_tenth_of_the_steps(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r"])
    cfg.run_dir.mkdir(parents=True)
    lines = [{**record(s, 64, 1.0), "reward_mean": float(s)} for s in range(20)]
    (cfg.run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = summarize(cfg.run_dir)
    assert out["reward_window_steps"] == 2
    assert (out["reward_first"], out["reward_last"]) == (0.5, 18.5)


def test_a_committed_step_without_a_record_is_recovered_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    """The controller died after step 2's checkpoint but before step 2's record (written after
    its weight sync): resuming writes a record rebuilt from the checkpoint's sample records,
    and the summary counts it once without inventing its time."""
    from asyncflow.runlog import recorded_steps, recovered_step_record

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r"])
    cfg.run_dir.mkdir(parents=True)
    path = cfg.run_dir / "metrics.jsonl"
    lines = [record(s, 64, 1.0) for s in (0, 1)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert recorded_steps(path) == {0, 1}
    samples = [
        {"step": 2, "version": 1 + (i % 2), "reward": float(i % 4 == 0), "length": 5}
        for i in range(64)
    ]
    rec = recovered_step_record(2, 3, samples, now=9.0)
    assert rec["samples"] == 64 and rec["response_tokens"] == 320 and rec["recovered"]
    assert rec["staleness_hist"] == {"0": 32, "1": 32} and rec["staleness_max"] == 1
    assert rec["reward_mean"] == pytest.approx(0.25)
    more = [rec, {"event": "resumed", "step": 3}, record(3, 64, 0.5)]
    with path.open("a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in more))
    assert recorded_steps(path) == {0, 1, 2, 3}
    out = summarize(cfg.run_dir)
    assert out["steps"] == 4
    assert out["samples_per_s"] == pytest.approx(3 * 64 / 2.5)  # the recovered step untimed


@pytest.mark.parametrize("with_summary", [True, False])
async def test_resuming_a_finished_run_starts_nothing_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], with_summary: bool
) -> None:
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "algorithm.steps=3"])
    ckpt = cfg.run_dir / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "controller_state.json").write_text(json.dumps({"step": 3, "version": 3}))
    lines = [record(s, 64, 1.0) for s in range(3)]
    metrics = "".join(json.dumps(x) + "\n" for x in lines)
    (cfg.run_dir / "metrics.jsonl").write_text(metrics)
    if with_summary:
        (cfg.run_dir / "summary.json").write_text(json.dumps({"steps": 3, "mine": True}))
    controller = Controller(cfg, resume=True)
    out = await controller.run()
    assert out == ({"steps": 3, "mine": True} if with_summary else summarize(cfg.run_dir))
    assert out["steps"] == 3
    assert controller.workers == {}  # no worker was started
    assert (cfg.run_dir / "metrics.jsonl").read_text() == metrics
    assert "already trained 3 steps" in capsys.readouterr().err


def test_resuming_a_run_without_a_checkpoint_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed before its first checkpoint (the default saves only at the end): --resume
    exits 2 with what to do, not a traceback, and starts nothing."""
    from asyncflow.controller.__main__ import main

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r"])
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_json()))
    assert main(["--resume", str(cfg.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint to resume from" in err and "checkpoint.every" in err
    assert "Traceback" not in err


def test_a_fresh_run_sets_an_earlier_run_of_the_same_name_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mixing two runs' checkpoints in one folder made pruning delete the new run's and
    --resume load the old run's; the earlier run is now moved aside whole."""
    from asyncflow.controller.checkpoints import set_aside_earlier_run

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    assert set_aside_earlier_run(run_dir) is None  # an empty folder is no earlier run
    ckpt = run_dir / "checkpoints" / "step_000300"
    ckpt.mkdir(parents=True)
    (ckpt / "controller_state.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    moved = set_aside_earlier_run(run_dir)
    assert moved is not None and not run_dir.exists()
    assert (moved / "checkpoints" / "step_000300" / "controller_state.json").is_file()
    assert (moved / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert f"moved it to {moved}" in capsys.readouterr().err
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    again = set_aside_earlier_run(run_dir)
    assert again is not None and again != moved and again.is_dir() and moved.is_dir()


async def test_resuming_with_a_setting_the_checkpoint_depends_on_changed_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new group shape would leave the restored index waiting forever for groups that never
    come; the refusal names every such key. Other keys (steps, lr, eval) may change."""
    from asyncflow.config import ConfigError

    where = [f"run.output_dir={tmp_path}", "run.name=r"]
    cfg = load_config(None, [*where, "algorithm.steps=3"])
    ckpt = cfg.run_dir / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "controller_state.json").write_text(json.dumps({"step": 3, "version": 3}))
    (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_json()))
    (cfg.run_dir / "summary.json").write_text(json.dumps({"steps": 3}))
    saved = cfg.run_dir / "config.json"
    changed = load_config(
        saved, [*where, "algorithm.prompts_per_step=4", "run.seed=5", "algorithm.kl_coef=0.1"]
    )
    with pytest.raises(ConfigError) as e:
        await Controller(changed, resume=True).run()
    text = str(e.value)
    assert "algorithm.prompts_per_step: 8 -> 4" in text and "run.seed: 0 -> 5" in text
    assert "algorithm.kl_coef" in text and "start a new run" in text
    fine = load_config(saved, [*where, "actor.lr=1e-5", "eval.every=7"])
    assert await Controller(fine, resume=True).run() == {"steps": 3}  # allowed: no refusal
