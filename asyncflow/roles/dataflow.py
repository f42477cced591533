"""The dataflow of a run, declared once: each task, the role and op that serve it, and the
columns it consumes and produces.

The controller registers the index's tasks from this table (lineage follows ``produces``) and
runs one stage loop per non-training task; the training tasks are the step's micro-batches,
whose extra columns (beyond the token ids) are what the trainer's loss reads. The table in
``docs/design.md`` is :func:`markdown_table` of it (a test keeps the two the same). Adding a
column to the pipeline is one line here (and the op that produces it).
"""

from __future__ import annotations

from dataclasses import dataclass

#: what every trainer op builds its batch from; the other consumed columns go to the loss
TOKEN_COLUMNS = ("prompt_ids", "response_ids")


@dataclass(frozen=True, slots=True)
class Task:
    """One consuming task of the index."""

    name: str  #: the index task
    role: str  #: the worker role that serves it
    op: str  #: the worker op (``POST /v1/work/{op}``)
    consumes: tuple[str, ...]  #: columns that must be ready before a row is handed out
    produces: tuple[str, ...] = ()  #: columns its op stores in the worker's unit
    groups: bool = False  #: handed whole groups only (a GRPO group is normalised together)
    #: the row meta key whose value a call must share: training takes step s's rows only
    partition: str | None = None
    #: a training task: streamed micro-batches and one optimizer step per step, not a stage loop
    trains: bool = False

    @property
    def loss_columns(self) -> tuple[str, ...]:
        """The consumed columns beyond the token ids (what a trainer's loss reads)."""
        return tuple(c for c in self.consumes if c not in TOKEN_COLUMNS)


def dataflow(algorithm: str, kl: bool) -> list[Task]:
    """The tasks of a run of ``algorithm`` ("grpo" or "ppo"), with a reference model (KL
    penalty) or not, in registration order."""
    tasks = [
        Task(
            "rollout",
            "rollout",
            "generate",
            ("prompt",),
            ("prompt_ids", "response_ids", "rollout_logprobs"),
            groups=True,
        )
    ]
    if algorithm == "grpo":
        # rewards and the group-normalised advantages in one call per batch of whole groups
        tasks.append(
            Task(
                "reward",
                "reward",
                "score_groups",
                ("response_ids",),
                ("reward", "advantages"),
                groups=True,
            )
        )
    else:
        tasks += [
            Task("reward", "reward", "score", ("response_ids",), ("reward",)),
            Task("values", "critic", "values", TOKEN_COLUMNS, ("values",)),
            Task(
                "gae",
                "critic",
                "gae",
                ("response_ids", "reward", "values"),
                ("advantages", "returns"),
            ),
            Task(
                "critic_train",
                "critic",
                "train_micro",
                (*TOKEN_COLUMNS, "values", "returns"),
                groups=True,
                partition="step",
                trains=True,
            ),
        ]
    if kl:
        tasks.append(
            Task("reference", "reference", "ref_logprobs", TOKEN_COLUMNS, ("ref_logprobs",))
        )
    actor_reads = ("rollout_logprobs", "advantages", *(("ref_logprobs",) if kl else ()))
    tasks.append(
        Task(
            "train",
            "actor",
            "train_micro",
            (*TOKEN_COLUMNS, *actor_reads),
            groups=True,
            partition="step",
            trains=True,
        )
    )
    return tasks


def markdown_table() -> str:
    """Every task of every algorithm as a markdown table (the one in ``docs/design.md``)."""
    rows = ["| task | role | op | consumes | produces | handed out |", "|---|---|---|---|---|---|"]
    found: dict[tuple[str, str], tuple[Task, list[str]]] = {}
    for algorithm in ("grpo", "ppo"):
        for t in dataflow(algorithm, kl=True):
            found.setdefault((t.name, t.op), (t, []))[1].append(algorithm.upper())
    for t, algorithms in found.values():
        only = f" ({algorithms[0]})" if len(algorithms) == 1 else ""
        consumes = ", ".join(f"`{c}`" for c in t.consumes if c != "ref_logprobs")
        if "ref_logprobs" in t.consumes:
            consumes += " (+ `ref_logprobs` with a KL penalty)"
        produces = ", ".join(f"`{c}`" for c in t.produces) or "(an optimizer step)"
        how = ("whole groups" if t.groups else "rows") + (
            f" of one {t.partition}" if t.partition else ""
        )
        rows.append(f"| `{t.name}`{only} | {t.role} | `{t.op}` | {consumes} | {produces} | {how} |")
    return "\n".join(rows)
