"""The contract between the controller and its workers (``asyncflow/roles/``): typed role
settings made from the config tree, validated on the worker's side, and config keys that do
what they say."""

from __future__ import annotations

import json

import pytest

from asyncflow.config import ConfigError, load_config
from asyncflow.roles.dataflow import dataflow
from asyncflow.roles.settings import (
    SETTINGS,
    ActorSettings,
    CriticSettings,
    RewardSettings,
    parse_settings,
    role_settings,
    settings_json,
)


@pytest.mark.parametrize("role", list(SETTINGS))
def test_settings_cross_the_process_boundary_unchanged(role: str) -> None:
    """What the controller sends (JSON) is what the worker reads back, typed."""
    cfg = load_config(None, ["algorithm.name=ppo", "algorithm.kl_coef=0.1", "actor.lr=1e-4"])
    sent = role_settings(cfg)[role]
    assert parse_settings(role, json.loads(settings_json(sent))) == sent


def test_a_partial_mapping_takes_the_rest_from_the_config_tree() -> None:
    actor = parse_settings("actor", {"threads": 1, "loss": {"kl_coef": 0.5}})
    assert isinstance(actor, ActorSettings)
    default = role_settings(load_config(None, []))["actor"]
    assert isinstance(default, ActorSettings)
    assert actor.threads == 1 and actor.loss.kl_coef == 0.5
    assert actor.lr == default.lr and actor.loss.clip_high == default.loss.clip_high


@pytest.mark.parametrize(
    "given, key",
    [({"thread": 1}, "thread"), ({"lr": "fast"}, "lr"), ({"loss": {"clip": 1}}, "loss.clip")],
)
def test_a_worker_refuses_settings_it_does_not_know_naming_the_key(
    given: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"invalid actor settings:\n  {key}:"):
        parse_settings("actor", given)


def test_the_reference_has_no_optimizer_keys() -> None:
    """reference.lr and the other trainer keys were accepted and ignored."""
    with pytest.raises(ConfigError, match=r"reference\.lr: unknown key"):
        load_config(None, ["reference.lr=1e-3"])
    assert load_config(None, ["reference.threads=2"]).reference.threads == 2


def test_the_timeouts_section_is_named_for_what_it_holds() -> None:
    """``workers.*`` held timeouts while ``rollout.workers`` is a count: the old name fails,
    naming the new one; ``timeouts.retries`` is the whole budget (there is no hidden extra)."""
    with pytest.raises(ConfigError, match="now called 'timeouts'"):
        load_config(None, ["workers.start_s=5"])
    cfg = load_config(None, ["timeouts.retries=4", "timeouts.start_s=5"])
    assert cfg.timeouts.retries == 4 and cfg.timeouts.start_s == 5


def test_critic_value_clip_and_reward_processes_are_keys_that_reach_the_workers() -> None:
    cfg = load_config(None, ["algorithm.name=ppo", "critic.value_clip=0.5", "reward.processes=3"])
    settings = role_settings(cfg)
    critic, reward = settings["critic"], settings["reward"]
    assert isinstance(critic, CriticSettings) and critic.value_clip == 0.5
    assert isinstance(reward, RewardSettings) and reward.processes == 3
    from asyncflow.workers.trainer import CriticRole

    assert CriticRole(critic).objective.clip_range == 0.5


def test_the_dataflow_declares_each_column_once_and_the_trainers_read_it() -> None:
    for algorithm in ("grpo", "ppo"):
        for kl in (False, True):
            tasks = dataflow(algorithm, kl)
            produced = [c for t in tasks for c in t.produces]
            assert len(produced) == len(set(produced)), (algorithm, kl)
            available = {"prompt", *produced}
            for t in tasks:  # every consumed column is produced by some task
                assert set(t.consumes) <= available, t
            train = next(t for t in tasks if t.name == "train")
            assert ("ref_logprobs" in train.loss_columns) is kl
            assert "advantages" in train.loss_columns


@pytest.mark.parametrize(
    "setting, devices, backend",
    [
        ("auto", ["cpu", "cpu"], "gloo"),
        ("auto", ["cuda:0", "cpu"], "gloo"),  # NCCL cannot move a CPU engine's tensors
        ("auto", ["cuda:0", "cuda:1", "cuda"], "nccl"),
        ("gloo", ["cuda:0", "cuda:1"], "gloo"),
        ("nccl", [], "nccl"),
    ],
)
def test_sync_backend_auto_follows_the_devices(
    setting: str, devices: list[str], backend: str
) -> None:
    """``sync.backend=auto`` always meant gloo; it now picks NCCL where every end is on CUDA."""
    from asyncflow.controller.sync import sync_backend

    assert sync_backend(setting, devices) == backend


def test_the_design_notes_show_the_dataflow_as_declared() -> None:
    """docs/design.md's task table is the dataflow's own (regenerate it with
    ``asyncflow.roles.dataflow.markdown_table()``)."""
    from pathlib import Path

    from asyncflow.roles.dataflow import markdown_table

    design = Path(__file__).parents[2] / "docs" / "design.md"
    assert markdown_table() in design.read_text(encoding="utf-8")


def test_nothing_outside_the_controller_imports_it() -> None:
    """Workers, the report and the contract never import the controller (the run log and the
    role settings used to live there)."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[2] / "asyncflow"
    pattern = re.compile(r"^\s*(from|import) asyncflow\.controller", re.M)
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "controller" not in p.relative_to(root).parts[:1]
        and pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == []
