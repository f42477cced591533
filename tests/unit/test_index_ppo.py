"""The sample index with PPO's two final consumers of a row: the actor ("train") and the critic
("critic_train"), as asyncflow.controller.stages.register_tasks declares them.

A unit lost after the actor acknowledged a row but before the critic did must recompute what
the critic still needs and nothing for the actor: the actor's update already happened. It used
to put the row back in the actor's (finished) step partition, where nobody reads it again, so
the row and its storage were kept forever; with a group's rows on different units, a sibling
was released meanwhile and complete() (and restore()) raised KeyError on it.
"""

from __future__ import annotations

import json

from asyncflow.transfer.index import SampleIndex

ROLLOUT = ("prompt_ids", "response_ids", "rollout_logprobs")


def ppo_index(freed: list[dict[str, list[int]]] | None = None) -> SampleIndex:
    idx = SampleIndex(None if freed is None else freed.append)
    idx.register_task("rollout", ["prompt"], list(ROLLOUT), groups=True)
    idx.register_task("reward", ["response_ids"], ["reward"])
    idx.register_task("values", ["prompt_ids", "response_ids"], ["values"])
    idx.register_task("gae", ["response_ids", "reward", "values"], ["advantages", "returns"])
    idx.register_task(
        "critic_train",
        ["prompt_ids", "response_ids", "values", "returns"],
        groups=True,
        partition="step",
    )
    idx.register_task(
        "train",
        ["prompt_ids", "response_ids", "rollout_logprobs", "advantages"],
        groups=True,
        partition="step",
    )
    return idx


def score(idx: SampleIndex, task: str, unit: str, n: int = 8) -> list[int]:
    """Run one producing task's ready rows (up to ``n``) with results on ``unit``."""
    cols = {
        "rollout": ROLLOUT,
        "reward": ("reward",),
        "values": ("values",),
        "gae": ("advantages", "returns"),
    }[task]
    b = idx.try_get_batch(task, n, at_least=1)
    assert b is not None, f"nothing ready for {task}"
    idx.complete(task, b.rows, {c: (unit, [3], "float32", 0) for c in cols})
    return b.rows


def one_step_group(idx: SampleIndex, *, two_reward_units: bool) -> tuple[int, int]:
    """A group of two rows of step 0, ready for both trainers; row a scored on reward0, row b
    on reward1 when ``two_reward_units``."""
    a, b = idx.add_group(2, [{"step": 0}, {"step": 0}])
    idx.mark_ready([a, b], "prompt", "dataset")
    score(idx, "rollout", "rollout0")
    if two_reward_units:
        assert score(idx, "reward", "reward0", 1) == [a]
        assert score(idx, "reward", "reward1", 1) == [b]
    else:
        score(idx, "reward", "reward0")
    score(idx, "values", "critic0")
    score(idx, "gae", "critic0")
    return a, b


def drain(idx: SampleIndex, trained: dict[str, list[int]]) -> None:
    """Run every task until nothing moves; the trainers' acks are counted in ``trained``."""
    for _ in range(50):
        moved = False
        for task in ("rollout", "reward", "values", "gae"):
            if idx.try_get_batch(task, 8, at_least=1) is None:
                continue
            moved = True
            idx.requeue(task, list(idx._tasks[task].leased))
            score(idx, task, "drain")
        for task in ("train", "critic_train"):
            for step in (0, 1, 2):
                b = idx.try_get_batch(task, 8, partition=step, at_least=1)
                if b is not None:
                    moved = True
                    idx.ack(task, b.rows)
                    trained[task] += b.rows
        if not moved:
            return


def test_actor_trained_row_is_not_trained_again_after_critic_unit_loss() -> None:
    freed: list[dict[str, list[int]]] = []
    idx = ppo_index(freed)
    a, b = one_step_group(idx, two_reward_units=False)
    actor = idx.try_get_batch("train", 1, partition=0)
    critic = idx.try_get_batch("critic_train", 1, partition=0)
    assert actor is not None and critic is not None
    idx.ack("train", actor.rows)
    idx.mark_unit_lost("critic0")  # values, advantages, returns
    assert {a, b} <= idx._tasks["train"].consumed  # the actor's update already happened
    idx.requeue("critic_train", critic.rows)  # the critic's pull from critic0 failed
    assert idx.try_get_batch("critic_train", 1, partition=0) is None  # waits for recompute
    assert sorted(score(idx, "values", "critic0.1")) == [a, b]
    assert sorted(score(idx, "gae", "critic0.1")) == [a, b]
    assert idx.try_get_batch("train", 1, partition=0) is None  # never handed out again
    critic = idx.try_get_batch("critic_train", 1, partition=0)
    assert critic is not None and critic.fields["values"][0].unit == "critic0.1"
    idx.ack("critic_train", critic.rows)
    assert len(idx) == 0  # both trainers done: released, not kept forever
    assert {r for d in freed for rows in d.values() for r in rows} == {a, b}


def test_sibling_released_before_recompute_is_not_a_key_error() -> None:
    idx = ppo_index()
    a, b = one_step_group(idx, two_reward_units=True)
    actor = idx.try_get_batch("train", 1, partition=0)
    critic = idx.try_get_batch("critic_train", 1, partition=0)
    assert actor is not None and critic is not None
    idx.ack("train", actor.rows)
    idx.mark_unit_lost("reward0")  # row a's reward (so its returns) are lost, b's are not
    idx.ack("critic_train", critic.rows)  # the critic's step commits with what it pulled
    assert b not in idx and a in idx
    assert score(idx, "reward", "reward1") == [a]
    assert score(idx, "gae", "critic0") == [a]  # used to raise KeyError on the released b
    assert len(idx) == 0
    assert idx.try_get_batch("train", 1, partition=0) is None


def test_restore_with_a_released_sibling_is_not_a_key_error() -> None:
    idx = ppo_index()
    a, b = one_step_group(idx, two_reward_units=True)
    actor = idx.try_get_batch("train", 1, partition=0)
    critic = idx.try_get_batch("critic_train", 1, partition=0)
    assert actor is not None and critic is not None
    idx.ack("train", actor.rows)
    idx.mark_unit_lost("reward0")
    idx.ack("critic_train", critic.rows)
    assert b not in idx and a in idx
    idx2 = SampleIndex.restore(json.loads(json.dumps(idx.snapshot())))  # used to raise
    for unit in list(idx2.resident_units()):
        if unit != "dataset":
            idx2.mark_unit_lost(unit)
    trained: dict[str, list[int]] = {"train": [], "critic_train": []}
    drain(idx2, trained)
    assert trained == {"train": [], "critic_train": []}  # both trainers already had row a
    assert len(idx2) == 0


def test_regenerated_after_the_actor_trained_goes_to_the_critic_only() -> None:
    """A rollout unit lost after the actor's ack: the row is generated again for the critic
    (its values and returns need the response), and the actor never sees it again."""
    idx = ppo_index()
    a, b = one_step_group(idx, two_reward_units=False)
    actor = idx.try_get_batch("train", 1, partition=0)
    assert actor is not None
    idx.ack("train", actor.rows)
    lost = idx.mark_unit_lost("rollout0")
    assert sorted(lost["response_ids"]) == [a, b]
    assert idx.try_get_batch("critic_train", 1, partition=0) is None
    trained: dict[str, list[int]] = {"train": [], "critic_train": []}
    drain(idx, trained)
    assert trained == {"train": [], "critic_train": [a, b]}
    assert len(idx) == 0


def test_loss_after_both_trainers_consumed_needs_no_redo() -> None:
    idx = ppo_index()
    one_step_group(idx, two_reward_units=False)
    for task in ("train", "critic_train"):
        batch = idx.try_get_batch(task, 1, partition=0)
        assert batch is not None
        idx.ack(task, batch.rows)
    assert len(idx) == 0
    assert idx.mark_unit_lost("critic0") == {}
