"""Unit tests of the index's leases: a call's results count for the rows its lease still holds.

A very late reply of an old call (the controller gave its rows back when the call failed, a
unit loss or a regeneration took them back) names the same rows as the newer call that holds
them now: with its lease, ``complete``/``ack``/``requeue`` refuse it and leave the newer call's
rows alone.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from asyncflow.transfer.index import BatchMeta, FieldMeta, SampleIndex

RESPONSE = {"response": ("u1", [3], "int64", 0)}


def grpo_index(on_release=None, *, group_reward: bool = False) -> SampleIndex:
    idx = SampleIndex(on_release)
    idx.register_task("rollout", ["prompt"], ["response"], groups=True)
    idx.register_task("reward", ["response"], ["reward"], groups=group_reward)
    idx.register_task("train", ["response", "reward"], groups=True)
    return idx


def admit(idx: SampleIndex, n_groups: int, size: int, **meta: object) -> list[list[int]]:
    groups = []
    for _ in range(n_groups):
        rows = idx.add_group(size, [dict(meta)] * size)
        idx.mark_ready(rows, "prompt", "dataset")
        groups.append(rows)
    return groups


def reward(unit: str) -> dict[str, tuple[str, list[int], str, int]]:
    return {"reward": (unit, [], "float32", 0)}


async def test_every_batch_gets_a_fresh_lease() -> None:
    idx = grpo_index()
    admit(idx, 3, 2)
    a = await idx.get_batch("rollout", 1)
    b = idx.try_get_batch("rollout", 1)
    waiter = asyncio.create_task(idx.get_batch("reward", 2))
    await asyncio.sleep(0)
    idx.complete("rollout", a.rows, RESPONSE, lease=a.lease)
    c = await asyncio.wait_for(waiter, 1)  # leased by the producer's call
    assert b is not None
    leases = [a.lease, b.lease, c.lease]
    assert len(set(leases)) == 3 and all(x >= 0 for x in leases)


async def test_a_stale_reply_after_a_requeue_is_refused() -> None:
    """Call A fails (the controller gives its rows back), call B gets them: A's late reply
    produces nothing, B's is accepted."""
    idx = grpo_index()
    (g,) = admit(idx, 1, 2)
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, RESPONSE)
    a = await idx.get_batch("reward", 2)
    idx.requeue("reward", a.rows, only_leased=True, lease=a.lease)
    b = await idx.get_batch("reward", 2)
    assert sorted(b.rows) == g and b.lease != a.lease
    assert sorted(idx.complete("reward", a.rows, reward("old"), lease=a.lease)) == g
    assert all("reward" not in idx.row_fields(r) for r in g)
    assert idx.try_get_batch("train", 1) is None
    assert idx.complete("reward", b.rows, reward("new"), lease=b.lease) == []
    t = idx.try_get_batch("train", 1)
    assert t is not None and {f.unit for f in t.fields["reward"]} == {"new"}


async def test_without_a_lease_complete_is_as_before() -> None:
    idx = grpo_index()
    admit(idx, 1, 2)
    b = await idx.get_batch("rollout", 1)
    assert idx.complete("rollout", b.rows, RESPONSE) == []
    a = await idx.get_batch("reward", 2)
    assert idx.complete("reward", a.rows[:1], reward("u2")) == []
    assert idx.complete("reward", a.rows, reward("u2")) == a.rows[:1]  # no longer leased


async def test_a_stale_call_only_loses_the_rows_its_lease_lost() -> None:
    """A regeneration took one row of A's batch back and B holds it now: A's reply counts for
    the other row only."""
    idx = grpo_index()
    g0, g1 = admit(idx, 2, 1)
    b = await idx.get_batch("rollout", 2)
    idx.complete("rollout", b.rows, RESPONSE)
    a = await idx.get_batch("reward", 2)
    idx.invalidate(g0, ["response"])  # back to rollout; A loses row g0
    r = await idx.get_batch("rollout", 1)
    idx.complete("rollout", r.rows, {"response": ("u3", [3], "int64", 1)}, lease=r.lease)
    b = await idx.get_batch("reward", 1)
    assert b.rows == g0
    assert idx.complete("reward", a.rows, reward("old"), lease=a.lease) == g0
    assert idx.row_fields(g1[0])["reward"].unit == "old"
    assert "reward" not in idx.row_fields(g0[0])
    assert idx.complete("reward", b.rows, reward("new"), lease=b.lease) == []
    assert idx.row_fields(g0[0])["reward"].unit == "new"


async def test_a_stale_reply_after_a_unit_loss_is_refused_and_freed_with_the_row() -> None:
    """A unit loss took A's rows back (their input was on it); they were recomputed and leased
    to B. A's results (on a unit that is alive) are not produced; what A wrote is freed with
    the row."""
    freed: list[dict[str, list[int]]] = []
    idx = grpo_index(freed.append)
    (g,) = admit(idx, 1, 2)
    r = await idx.get_batch("rollout", 1)
    idx.complete("rollout", r.rows, RESPONSE, lease=r.lease)
    a = await idx.get_batch("reward", 2)
    idx.mark_unit_lost("u1")
    r = await idx.get_batch("rollout", 1)
    idx.complete("rollout", r.rows, {"response": ("u3", [3], "int64", 1)}, lease=r.lease)
    b = await idx.get_batch("reward", 2)
    assert sorted(idx.complete("reward", a.rows, reward("old"), lease=a.lease)) == g
    assert idx.complete("reward", b.rows, reward("new"), lease=b.lease) == []
    t = await idx.get_batch("train", 1)
    assert {f.unit for f in t.fields["reward"]} == {"new"}
    assert idx.ack("train", t.rows, lease=t.lease) == []
    assert len(idx) == 0
    units = {u for f in freed for u in f}
    assert {"old", "new", "u3", "dataset"} <= units


async def test_group_task_stale_lease_after_a_loss() -> None:
    """A group task (GRPO's reward scores whole groups): a loss takes the group back from A,
    B gets it whole; A's reply is refused for the whole group, B's accepted."""
    idx = grpo_index(group_reward=True)
    (g,) = admit(idx, 1, 3)
    r = await idx.get_batch("rollout", 1)
    idx.complete("rollout", r.rows, RESPONSE, lease=r.lease)
    a = await idx.get_batch("reward", 1)
    assert a.rows == g
    idx.mark_unit_lost("u1")
    r = await idx.get_batch("rollout", 1)
    idx.complete("rollout", r.rows, {"response": ("u3", [3], "int64", 1)}, lease=r.lease)
    b = await idx.get_batch("reward", 1)
    assert b.rows == g
    assert sorted(idx.complete("reward", a.rows, reward("old"), lease=a.lease)) == g
    assert idx.complete("reward", b.rows, reward("new"), lease=b.lease) == []
    assert all(idx.row_fields(x)["reward"].unit == "new" for x in g)


async def test_group_producer_stale_lease_after_a_requeue_and_a_regeneration() -> None:
    idx = grpo_index()
    (g,) = admit(idx, 1, 2)
    a = await idx.get_batch("rollout", 1)
    idx.requeue("rollout", a.rows, lease=a.lease)
    b = await idx.get_batch("rollout", 1)
    assert b.rows == g
    assert sorted(idx.complete("rollout", a.rows, RESPONSE, lease=a.lease)) == g
    assert all("response" not in idx.row_fields(x) for x in g)
    assert idx.complete("rollout", b.rows, RESPONSE, lease=b.lease) == []
    # regenerated (the reward failed): the group is rolled out again, by call C
    s = await idx.get_batch("reward", 2)
    idx.invalidate(g, ["response"])
    c = await idx.get_batch("rollout", 1)
    assert sorted(idx.complete("rollout", b.rows, RESPONSE, lease=b.lease)) == g
    assert sorted(idx.complete("reward", s.rows, reward("u2"), lease=s.lease)) == g
    redone = {"response": ("u3", [3], "int64", 1)}
    assert idx.complete("rollout", c.rows, redone, lease=c.lease) == []
    assert all(idx.row_fields(x)["response"].unit == "u3" for x in g)


async def test_a_stale_requeue_leaves_the_newer_lease_alone() -> None:
    idx = grpo_index()
    admit(idx, 1, 2)
    a = await idx.get_batch("rollout", 1)
    idx.requeue("rollout", a.rows, only_leased=True, lease=a.lease)
    b = await idx.get_batch("rollout", 1)
    idx.requeue("rollout", a.rows, only_leased=True, lease=a.lease)  # A's failure, reported late
    idx.requeue("rollout", a.rows, lease=a.lease)
    assert idx.try_get_batch("rollout", 1) is None  # B still holds the group
    assert idx.complete("rollout", b.rows, RESPONSE, lease=b.lease) == []
    # a lease that no longer holds anything (its rows were completed) requeues nothing
    idx.requeue("rollout", b.rows, lease=b.lease)
    assert idx.try_get_batch("rollout", 1) is None
    with pytest.raises(ValueError, match="not leased"):
        idx.requeue("rollout", b.rows)  # without a lease: as before


async def test_a_stale_ack_does_not_consume_the_newer_lease_rows() -> None:
    idx = grpo_index()
    (g,) = admit(idx, 1, 2)
    r = await idx.get_batch("rollout", 1)
    idx.complete("rollout", r.rows, RESPONSE)
    s = await idx.get_batch("reward", 2)
    idx.complete("reward", s.rows, reward("u2"))
    a = await idx.get_batch("train", 1)
    idx.requeue("train", a.rows, lease=a.lease)  # the trainer's call failed
    b = await idx.get_batch("train", 1)
    assert idx.ack("train", a.rows, lease=a.lease) == a.rows  # A's late success: not counted
    assert len(idx) == 2  # not consumed by train
    idx.requeue("train", b.rows, lease=b.lease)
    c = idx.try_get_batch("train", 1)  # B gave them back: they are ready again, once
    assert c is not None and c.rows == g
    assert idx.ack("train", c.rows, lease=c.lease) == []
    assert len(idx) == 0
    with pytest.raises(ValueError, match="not leased"):
        idx.ack("train", c.rows)  # without a lease: as before


async def test_partitioned_tasks_carry_leases() -> None:
    idx = SampleIndex()
    idx.register_task("score", ["x"], ["y"], groups=True, partition="step")
    idx.register_task("train", ["x", "y"], groups=True, partition="step")
    (g0,) = admit_x(idx, 0)
    (g1,) = admit_x(idx, 1)
    a = idx.try_get_batch("score", 1, partition=1)
    assert a is not None and a.rows == g1
    idx.requeue("score", a.rows, lease=a.lease)
    b = idx.try_get_batch("score", 1, partition=1)
    assert b is not None and b.rows == g1
    y = {"y": ("w", [], "float32", 0)}
    assert sorted(idx.complete("score", a.rows, y, lease=a.lease)) == g1
    assert idx.try_get_batch("train", 1, partition=1) is None
    assert idx.complete("score", b.rows, y, lease=b.lease) == []
    c = idx.try_get_batch("score", 1, partition=0)
    assert c is not None and c.rows == g0
    assert idx.complete("score", c.rows, y, lease=c.lease) == []
    t1 = idx.try_get_batch("train", 1, partition=1)
    assert t1 is not None and t1.rows == g1
    idx.requeue("train", t1.rows, lease=t1.lease)
    t2 = idx.try_get_batch("train", 1, partition=1)
    assert t2 is not None and t2.rows == g1
    assert idx.ack("train", t1.rows, lease=t1.lease) == g1
    assert idx.try_get_batch("train", 1, partition=1) is None
    assert idx.ack("train", t2.rows, lease=t2.lease) == []
    assert all(r not in idx for r in g1) and all(r in idx for r in g0)


def admit_x(idx: SampleIndex, step: int) -> list[list[int]]:
    rows = idx.add_group(2, [{"step": step}] * 2)
    idx.mark_ready(rows, "x", "dataset")
    return [rows]


async def test_a_waiter_cancelled_after_its_batch_was_leased_gives_it_back() -> None:
    idx = grpo_index()
    (g,) = admit(idx, 1, 2)
    r = await idx.get_batch("rollout", 1)
    w = asyncio.create_task(idx.get_batch("reward", 2))
    await asyncio.sleep(0)
    idx.complete("rollout", r.rows, RESPONSE)  # leases the rows to the waiter ...
    w.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await w
    b = idx.try_get_batch("reward", 2)
    assert b is not None and sorted(b.rows) == g


async def test_snapshots_carry_no_leases() -> None:
    idx = grpo_index()
    admit(idx, 2, 2)
    a = await idx.get_batch("rollout", 1)
    snap = json.loads(json.dumps(idx.snapshot()))
    assert set(snap) == {"next_row", "next_group", "released_rows", "tasks", "groups", "rows"}
    assert all(
        set(t) == {"name", "requires", "produces", "groups", "policy", "partition", "consumed"}
        and t["policy"] == "fifo"
        for t in snap["tasks"]
    )
    idx2 = SampleIndex.restore(snap)
    b = idx2.try_get_batch("rollout", 1)  # restored rows are unleased: handed out again
    assert b is not None and b.rows == a.rows
    assert idx2.complete("rollout", b.rows, RESPONSE, lease=b.lease) == []


async def test_an_old_snapshot_with_another_policy_restores_fifo() -> None:
    idx = SampleIndex()
    idx.register_task("train", ["x"])
    rows = idx.add_rows([{}] * 3)
    for r, v in zip(rows, [0, 2, 1]):
        idx.mark_ready([r], "x", "u", version=v)
    snap = json.loads(json.dumps(idx.snapshot()))
    snap["tasks"][0]["policy"] = "freshest"  # written by an older version
    idx2 = SampleIndex.restore(snap)
    b = idx2.try_get_batch("train", 3)
    assert b is not None and b.rows == rows


def test_batch_meta_json_carries_the_lease() -> None:
    fm = FieldMeta("u", (3,), "int64", 0)
    b = BatchMeta("reward", [4, 5], [2, 2], {"response": [fm, fm]}, [{}, {}], 7)
    data = json.loads(json.dumps(b.to_json()))
    assert data["lease"] == 7
    assert BatchMeta.from_json(data) == b
    del data["lease"]
    assert BatchMeta.from_json(data).lease == -1
    assert BatchMeta("reward", [], [], {}, []).lease == -1


def test_worker_parses_the_lease_of_a_batch() -> None:
    from asyncflow.transfer.service import BadRequest
    from asyncflow.workers.server import _parse_batch

    fm = FieldMeta("u", (3,), "int64", 0)
    b = BatchMeta("reward", [4], [2], {"response": [fm]}, [{}], 7)
    data = json.loads(json.dumps(b.to_json()))
    assert _parse_batch(data) == b
    del data["lease"]
    parsed = _parse_batch(data)
    assert parsed is not None and parsed.lease == -1
    for bad in (-2, 1.5, "3", True, None, [1]):
        with pytest.raises(BadRequest, match=r"batch\.lease"):
            _parse_batch({**data, "lease": bad})
