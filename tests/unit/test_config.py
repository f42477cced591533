"""The config tree: presets load, overrides parse, mistakes name the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncflow.config import Config, ConfigError, load_config, parse_override

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_the_documented_default_run() -> None:
    cfg = Config()
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.staleness == 1
    assert cfg.algorithm.streaming and cfg.rollout.engine == "vllm"
    assert cfg.model.path == "builtin:tiny-adder" and cfg.rows_per_step == 64


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_preset_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_overrides_are_typed_from_yaml() -> None:
    cfg = load_config(
        None,
        [
            "actor.lr=1e-5",
            "algorithm.streaming=false",
            "rollout.urls=[http://a:1, http://b:2]",
            "run.name=x",
        ],
    )
    assert cfg.actor.lr == 1e-5 and cfg.algorithm.streaming is False
    assert cfg.rollout.urls == ["http://a:1", "http://b:2"] and cfg.run.name == "x"
    assert parse_override("a.b=3") == (["a", "b"], 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["actor.lrr=3"], "actor.lrr: unknown key; expected one of ['lr'"),
        (["nope=1"], "nope: unknown key"),
        (["algorithm.staleness=-1"], "algorithm.staleness: Input should be greater"),
        (["rollout.engine=foo"], "rollout.engine: Input should be 'vllm' or 'transformers'"),
        (["actor.mixed_precision=fp8"], "actor.mixed_precision: Input should be 'fp32' or 'bf16'"),
        (["actor.lr=fast"], "actor.lr: Input should be a valid number"),
        (["algorithm.samples_per_prompt=1"], "GRPO needs samples_per_prompt >= 2"),
        (["actor.workers=8"], "actor.workers=8 ranks need at least"),
        (["actor=3"], "actor: Input should be a valid dictionary"),
        (["actor.lr.x=3"], "actor.lr: Input should be a valid number"),
        (["run.name=a", "run.name.x=1"], "run.name is a value, not a section"),
        (["novalue"], "must look like key.sub=value"),
    ],
)
def test_mistakes_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top"):
        load_config(listy)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError):
        load_config(binary)


def test_config_module_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, asyncflow.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("value", [True, False])
def test_trainer_keys_reach_the_training_engine(value: bool) -> None:
    """A key of the actor/critic sections ends up in the engine's TrainerConfig, not only in
    the validated tree (actor.shared_prefix used to exist only inside the engine)."""
    from asyncflow.roles.settings import role_settings
    from asyncflow.workers.trainer import _engine_config

    cfg = load_config(
        None, [f"actor.shared_prefix={str(value).lower()}", "actor.mixed_precision=bf16"]
    )
    settings = role_settings(cfg)
    engine = _engine_config(settings["actor"])
    assert engine.shared_prefix is value and engine.mixed_precision == "bf16"
    assert _engine_config(settings["critic"]).shared_prefix is True


def test_text_keys_take_the_text_as_written() -> None:
    """YAML would make run.name=2024-06-01 a date, 7 a number and cut "exp #1" at the comment:
    a text key keeps what was typed (how --resume runs/2024-06-01 names its run)."""
    cfg = load_config(
        None,
        [
            "run.name=2024-06-01",
            "run.output_dir=7",
            "model.path=models/exp #1",
            "rollout.vllm.cpu_threads_bind=0",
            "run.token=null",
        ],
    )
    assert cfg.run.name == "2024-06-01" and cfg.run.output_dir == "7"
    assert cfg.model.path == "models/exp #1" and cfg.rollout.vllm.cpu_threads_bind == "0"
    assert cfg.run.token is None
    assert load_config(None, ['run.name="quoted"']).run.name == "quoted"
    assert load_config(None, ["actor.lr=1e-5"]).actor.lr == 1e-5  # other keys stay YAML


@pytest.mark.parametrize(
    ("overrides", "whiten"),
    [
        ([], False),  # streaming: a gae call may hold one row
        (["algorithm.streaming=false"], True),  # a gae call holds the whole step
        (["algorithm.whiten_advantages=true"], True),
        (["algorithm.streaming=false", "algorithm.whiten_advantages=false"], False),
    ],
)
def test_ppo_whitens_advantages_only_over_whole_steps_by_default(
    overrides: list[str], whiten: bool
) -> None:
    from asyncflow.roles.settings import role_settings

    cfg = load_config(None, ["algorithm.name=ppo", *overrides])
    assert role_settings(cfg)["critic"].whiten_advantages is whiten


def test_loss_keys_reach_the_actor_objective() -> None:
    """old_policy and dual_clip are config keys (they were reachable only in code)."""
    from asyncflow.roles.settings import role_settings
    from asyncflow.workers.trainer import ActorRole

    cfg = load_config(None, ["algorithm.old_policy=behaviour", "algorithm.dual_clip=3.0"])
    role = ActorRole(role_settings(cfg)["actor"])
    assert role.objective.old_policy == "behaviour" and role.objective.config.dual_clip == 3.0
    default = ActorRole(role_settings(load_config(None, []))["actor"])
    assert default.objective.old_policy == "current" and default.objective.config.dual_clip is None
    with pytest.raises(ConfigError, match="dual_clip"):
        load_config(None, ["algorithm.dual_clip=0.5"])
