"""Where spawned workers run: CPU cores and torch threads per role (``run.pin_cpus``,
``run.cpu_layout``).

Placement is not a setting of the run but of whoever starts the processes, so it is applied
here, to the role settings of the workers this controller spawns; attached workers are placed
by whoever started them.

On a 2-core machine the rollout engine and the trainers otherwise thrash each other's threads:
rollout gets the first half of the cores, the trainer roles the second half ("split"), or every
core ("overlap": their threads then take up what rollout leaves idle).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from asyncflow.config import Config
from asyncflow.roles.settings import RoleSettings, RolloutSettings, TrainerSettings

TRAINER_ROLES = ("actor", "reference", "critic")


def cpu_placement(cfg: Config, cpus: Sequence[int]) -> dict[str, list[int]]:
    """The cores each role is pinned to, from the cores this process may use; empty (nothing
    pinned) with ``run.pin_cpus`` off or fewer than two cores."""
    cpus = sorted(cpus)
    if not cfg.run.pin_cpus or len(cpus) < 2:
        return {}
    half = len(cpus) // 2
    trainers = cpus[half:] if cfg.run.cpu_layout == "split" else cpus
    return {"rollout": cpus[:half], **{role: trainers for role in TRAINER_ROLES}}


def place(
    cfg: Config, settings: Mapping[str, RoleSettings], cpus: Sequence[int]
) -> dict[str, RoleSettings]:
    """``settings`` with each role's cores, torch threads (one per core, unless the config sets
    them) and the vLLM CPU build's thread binding (unless the config sets it)."""
    placed = dict(settings)
    for role, mine in cpu_placement(cfg, cpus).items():
        s = placed.get(role)
        if s is None:
            continue
        update: dict[str, object] = {"cpus": mine}
        if isinstance(s, RolloutSettings) and s.vllm.cpu_threads_bind is None:
            bind = ",".join(map(str, mine))
            update["vllm"] = s.vllm.model_copy(update={"cpu_threads_bind": bind})
        if isinstance(s, TrainerSettings) and not s.threads:
            update["threads"] = len(mine)
        placed[role] = s.model_copy(update=update)
    return placed
