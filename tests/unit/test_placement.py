"""Where spawned workers run (``run.pin_cpus``, ``run.cpu_layout``): rollout on the first half
of the cores, the trainer roles on the second half ("split") or on every core ("overlap")."""

from __future__ import annotations

import pytest

from asyncflow.config import load_config
from asyncflow.controller.placement import cpu_placement, place
from asyncflow.roles.settings import role_settings


def test_split_gives_rollout_and_trainers_disjoint_halves() -> None:
    cfg = load_config(None, ["run.cpu_layout=split"])
    cores = cpu_placement(cfg, [3, 0, 2, 1])
    assert cores["rollout"] == [0, 1]
    assert cores["actor"] == cores["reference"] == cores["critic"] == [2, 3]


def test_overlap_lets_trainers_use_every_core() -> None:
    cfg = load_config(None, ["run.cpu_layout=overlap"])
    cores = cpu_placement(cfg, [0, 1, 2, 3])
    assert cores["rollout"] == [0, 1]
    assert cores["actor"] == cores["critic"] == [0, 1, 2, 3]


@pytest.mark.parametrize("overrides, cpus", [(["run.pin_cpus=false"], [0, 1]), ([], [0])])
def test_nothing_is_pinned_when_off_or_on_one_core(overrides: list[str], cpus: list[int]) -> None:
    cfg = load_config(None, overrides)
    assert cpu_placement(cfg, cpus) == {}
    assert place(cfg, role_settings(cfg), cpus) == role_settings(cfg)


@pytest.mark.parametrize("layout, trainer_cores", [("split", [1]), ("overlap", [0, 1])])
def test_placed_settings_carry_cores_threads_and_the_vllm_binding(
    layout: str, trainer_cores: list[int]
) -> None:
    cfg = load_config(None, [f"run.cpu_layout={layout}", "algorithm.name=ppo"])
    placed = place(cfg, role_settings(cfg), [0, 1])
    rollout, actor, critic = placed["rollout"], placed["actor"], placed["critic"]
    assert rollout.cpus == [0] and rollout.vllm.cpu_threads_bind == "0"
    assert actor.cpus == critic.cpus == trainer_cores
    assert actor.threads == critic.threads == len(trainer_cores)
    assert placed["reward"].cpus is None  # the reward worker is not pinned


def test_what_the_config_sets_is_kept() -> None:
    cfg = load_config(None, ["actor.threads=3", "rollout.vllm.cpu_threads_bind=0-1"])
    placed = place(cfg, role_settings(cfg), [0, 1, 2, 3])
    assert placed["actor"].threads == 3
    assert placed["rollout"].vllm.cpu_threads_bind == "0-1"
