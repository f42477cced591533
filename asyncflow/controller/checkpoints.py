"""Checkpoints and resuming: what makes a step durable, and how a run continues from one.

A step's checkpoint, ``checkpoints/step_NNNNNN/``, is the actor as a transformers folder
(weights + optimizer), with PPO the critic in its ``critic/`` sub-folder, and
``controller_state.json``: the loader position, the admitted steps, the index snapshot and the
step's sample records. That file is written last, atomically: a checkpoint is whole or absent.
The newest ``checkpoint.keep`` are kept.

- :meth:`Checkpoints.save` is the step driver's commit of a step when one is due; the step's rows
  are acknowledged right after it, so the snapshot saves them as released.
- :meth:`Checkpoints.restore` is ``--resume``: the trainers load the newest checkpoint, the
  loader, admission and versions continue from it, ``samples.jsonl`` is cut back to what it
  covers (and a committed step whose metrics line the dead run did not write gets one rebuilt
  from it). The index itself comes back first (:func:`resumed_index`), before the pieces that
  use it are built; every unit it names is marked lost, since its data died with the old workers.
- :meth:`Checkpoints.load_trainer` restores a trainer the supervisor replaced, from the version
  training had reached (so surviving trainer failures needs ``checkpoint.every=1``).

A fresh run never writes into an earlier run's directory (:func:`set_aside_earlier_run`), and a
resumed one refuses settings its checkpoint cannot follow (:func:`check_resumable`).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from asyncflow.config import Config, ConfigError
from asyncflow.controller.concurrency import all_of
from asyncflow.controller.fleet import Fleet
from asyncflow.controller.pool import WorkerError, WorkerHandle
from asyncflow.controller.stages import Admission
from asyncflow.controller.sync import Versions
from asyncflow.roles.ops import CheckpointResult
from asyncflow.runlog import RunLog, recorded_steps, recovered_step_record
from asyncflow.transfer.index import SampleIndex

#: where a step's checkpoint keeps the PPO critic (the actor's is the step's folder itself)
CRITIC_SUBDIR = "critic"


class Checkpoints:
    """The checkpoints of the run in ``run_dir`` (see the module's docstring)."""

    def __init__(
        self,
        run_dir: Path,
        keep: int,
        fleet: Fleet,
        log: RunLog,
        versions: Versions,
        admission: Admission,
        index: SampleIndex,
    ) -> None:
        self.root = run_dir / "checkpoints"
        self.keep = keep
        self.fleet = fleet
        self.log = log
        self.versions = versions
        self.admission = admission
        self.index = index
        self.saved = -1  #: the step number of the newest checkpoint this run wrote
        #: the steps the critic's version counts less than the actor's (0 unless a resumed
        #: checkpoint had no critic): :meth:`save` waits for the critic to have taken the step
        self.critic_behind = 0

    def dir(self, step: int) -> Path:
        """Step ``step``'s checkpoint folder, where the run directory is now."""
        return (self.root / f"step_{step:06d}").resolve()

    async def save(self, step: int, version: int, records: list[dict[str, Any]]) -> None:
        """The checkpoint of ``step`` (steps trained; the actor at ``version``) whose sample
        records are ``records``: every trainer rank, then the controller's state, last."""
        path = self.dir(step)
        # every data-parallel rank: rank 0 writes, the others wait at its barrier
        await self._all("save", self.fleet.workers["actor"], path)
        if "critic" in self.fleet.workers:
            await self._save_critic(path / CRITIC_SUBDIR, version)
        path.mkdir(parents=True, exist_ok=True)  # the actor may be on another host
        state = {
            "step": step,
            "version": version,
            "loader": self.admission.loader.state(),
            "admitted_steps": self.admission.admitted_steps,
            # this step's rows are acknowledged right after this commit: saved as released
            "index": self.index.snapshot(done=[int(r["row"]) for r in records]),
            "samples_before": self.log.samples_written,
            "samples_step": records,
            "path": str(path),
        }
        tmp = path / "controller_state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(path / "controller_state.json")  # atomic: a checkpoint is whole or absent
        self.saved = step
        self._prune()

    async def _save_critic(self, path: Path, version: int) -> None:
        """Save the PPO critic (every rank: rank 0 writes, the others wait at its barrier) once
        it has taken this step's update: its step runs beside the actor's, and this is the
        actor's commit. Its version counts its steps, like the actor's (less any steps it is
        behind, see :meth:`restore`). A critic that dies meanwhile is replaced from the last
        checkpoint and redoes the step; this waits for it."""
        target = version - self.critic_behind
        while True:
            ranks = list(self.fleet.workers["critic"])
            await self.fleet.wait_ready(*ranks)
            try:
                info = await ranks[0].get("/v1/info")
            except WorkerError:  # died: wait_ready waits for its replacement
                await asyncio.sleep(0.05)
                continue
            if int(info.get("policy_version", 0)) >= target:
                break
            await asyncio.sleep(0.05)
        await self._all("save", ranks, path)

    async def _all(self, op: str, ranks: list[WorkerHandle], path: Path) -> list[CheckpointResult]:
        """``op`` ("save" or "load") of ``path`` on every rank at once."""
        params = {"path": str(path)}
        return await all_of(
            (f"{op}-{w.name}", self.fleet.op(w, CheckpointResult, op, params=params)) for w in ranks
        )

    def _prune(self) -> None:
        done = sorted(self.root.glob("step_*/controller_state.json"))
        for old in done[: -self.keep]:
            shutil.rmtree(old.parent, ignore_errors=True)

    async def restore(self, state: dict[str, Any]) -> int:
        """Continue from a checkpoint's controller ``state`` (:func:`load_checkpoint`): the
        actor's weights and optimizer (with PPO the critic's too, from its ``critic/`` folder),
        the loader position, the admitted steps, the versions, and the trained-sample log cut
        back to the checkpoint. Returns the step to continue from."""
        log = self.log
        self.admission.loader.position = int(state["loader"]["position"])
        self.admission.admitted_steps = int(state["admitted_steps"])
        self.versions.restore(int(state["version"]))
        # where the run directory is now (it may have been moved, or mounted elsewhere), not
        # the absolute path recorded when the checkpoint was written
        path = self.dir(int(state["step"]))
        await self._all("load", self.fleet.workers["actor"], path)  # every data-parallel rank
        if "critic" in self.fleet.workers:
            critic = path / CRITIC_SUBDIR
            ranks = self.fleet.workers["critic"]
            if (critic / "trainer_state.json").is_file():
                critic_version = (await self._all("load", ranks, critic))[0].version
            else:  # a checkpoint written before critics were saved: say so, loudly
                critic_version = int((await ranks[0].get("/v1/info")).get("policy_version", 0))
                warning = (
                    f"{path} holds no critic checkpoint (critic/): the critic starts from its "
                    "initial weights and a fresh value head"
                )
                print(f"warning: {warning}", file=sys.stderr)
                log.metrics({"event": "critic_not_restored", "why": warning, "time_s": log.now()})
            self.critic_behind = int(state["version"]) - critic_version
        log.truncate_samples(int(state["samples_before"]), state["samples_step"])
        last = int(state["step"]) - 1  # committed; its record is written after its sync
        if last >= 0 and last not in recorded_steps(self.root.parent / "metrics.jsonl"):
            version = self.versions.served
            log.metrics(recovered_step_record(last, version, state["samples_step"], log.now()))
        log.metrics(
            {
                "event": "resumed",
                "step": state["step"],
                "version": self.versions.served,
                "time_s": log.now(),
            }
        )
        return int(state["step"])

    async def load_trainer(self, worker: WorkerHandle, role: str) -> None:
        """Restore a replaced trainer: the checkpoint of the version training had reached (its
        last committed step, possibly one ahead of what the rollout engines serve) -- the
        actor's is the step's folder, the critic's its ``critic/`` sub-folder; without one,
        fail."""
        version = self.versions.trained
        path = self.dir(version)
        if role == "critic":
            path = path / CRITIC_SUBDIR
        if version == 0:
            return  # nothing trained yet: the fresh worker's initial weights are right
        if not (path / "trainer_state.json").exists():
            raise RuntimeError(
                f"{worker.name} died at policy version {version} and there is no {role} "
                f"checkpoint at {path}; set checkpoint.every=1 to survive trainer failures"
            )
        await self.fleet.op(worker, CheckpointResult, "load", params={"path": str(path)})


def resumed_index(
    state: Mapping[str, Any], on_release: Callable[[dict[str, list[int]]], None]
) -> SampleIndex:
    """The index of a checkpoint's controller ``state``. Its rows' data died with the old
    workers: every unit but the dataset is marked lost, and lineage recomputes what is needed."""
    restored = SampleIndex.restore(state["index"], on_release)
    for unit in list(restored.resident_units()):
        if unit != "dataset":
            restored.mark_unit_lost(unit)
    return restored


def set_aside_earlier_run(run_dir: Path) -> Path | None:
    """A fresh run never writes into an earlier run's directory: mixing the two would mix their
    checkpoints (pruning would delete the new ones, ``--resume`` would load the old). The
    earlier run is renamed to ``NAME.old-YYYYmmdd-HHMMSS`` and kept whole; returns where."""
    earlier = ("config.json", "metrics.jsonl", "samples.jsonl", "checkpoints")
    if not any((run_dir / name).exists() for name in earlier):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    run_dir.rename(dest)
    print(
        f"{run_dir} held an earlier run: moved it to {dest} (to continue a run instead, "
        f"pass --resume {run_dir})",
        file=sys.stderr,
    )
    return dest


#: What a resumed run must keep: its checkpoint's index (groups of this shape, these tasks),
#: loader position (over this dataset, in this order) and trainer state (this model) depend on it.
FIXED_ON_RESUME = (
    "algorithm.name",
    "algorithm.prompts_per_step",
    "algorithm.samples_per_prompt",
    "model.path",
    "data.source",
    "data.train_size",
    "data.shuffle",
    "data.prompt_field",
    "data.answer_field",
    "data.on_bad_row",
    "data.max_prompt_chars",
    "run.seed",
)


def check_resumable(saved: Mapping[str, Any], cfg: Config) -> None:
    """Refuse to resume with a setting the checkpoint cannot follow (it would wait forever for
    groups of a new shape, or load a different dataset's positions); name each one."""
    now = cfg.to_json()

    def get(tree: Mapping[str, Any], key: str) -> Any:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    changed = [
        f"{key}: {get(saved, key)!r} -> {get(now, key)!r}"
        for key in FIXED_ON_RESUME
        if get(saved, key) is not None and get(saved, key) != get(now, key)
    ]
    kl_then = float(get(saved, "algorithm.kl_coef") or 0.0) > 0
    if kl_then != (cfg.algorithm.kl_coef > 0):
        changed.append("algorithm.kl_coef: the KL penalty (a reference worker) turned on or off")
    if changed:
        raise ConfigError(
            "cannot resume with these settings changed (the checkpoint depends on them; start "
            "a new run instead):\n  " + "\n  ".join(changed)
        )


class NoCheckpoint(ValueError):
    """``--resume`` of a run directory that holds no complete checkpoint."""


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The controller state of the newest complete checkpoint of a run."""
    done = sorted((run_dir / "checkpoints").glob("step_*/controller_state.json"))
    if not done:
        raise NoCheckpoint(
            f"{run_dir}: no complete checkpoint to resume from. A run saves one every "
            "checkpoint.every steps (0, the default: only at the end) and when it is stopped "
            "with SIGTERM; a run killed before any was saved must start again (without "
            "--resume). Set checkpoint.every=N for runs that must survive a kill."
        )
    state: dict[str, Any] = json.loads(done[-1].read_text())
    return state
