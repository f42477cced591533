"""Unit tests of the sample index: exactly-once per task, groups, loss, release, snapshot."""

from __future__ import annotations

import asyncio

import pytest

from asyncflow.transfer.index import SampleIndex


def grpo_index(on_release=None) -> SampleIndex:
    idx = SampleIndex(on_release)
    idx.register_task("rollout", ["prompt"], ["response"], groups=True)
    idx.register_task("reward", ["response"], ["reward"])
    idx.register_task("train", ["response", "reward"], groups=True)
    return idx


def admit(idx: SampleIndex, n_groups: int, size: int) -> list[list[int]]:
    groups = []
    for _ in range(n_groups):
        rows = idx.add_group(size, [{"length": 4}] * size)
        idx.mark_ready(rows, "prompt", "dataset")
        groups.append(rows)
    return groups


async def test_each_task_consumes_each_row_once() -> None:
    idx = grpo_index()
    admit(idx, 3, 2)
    seen = []
    for _ in range(3):
        b = await idx.get_batch("rollout", 1)
        seen += b.rows
        idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    assert sorted(seen) == list(range(6))
    assert idx.try_get_batch("rollout", 1) is None
    got = []
    while (b := idx.try_get_batch("reward", 4)) is not None:
        got += b.rows
        idx.ack("reward", b.rows)
    assert len(got) == 4  # two rows remain ready: fewer than a batch of 4
    b = await idx.get_batch("reward", 2)
    assert sorted(got + b.rows) == list(range(6))


async def test_group_task_gets_whole_groups_only() -> None:
    idx = grpo_index()
    g0, g1 = admit(idx, 2, 3)
    b = await idx.get_batch("rollout", 2)
    idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    # reward is per row: score all of g1 but only part of g0
    for rid in g1 + g0[:2]:
        idx.mark_ready([rid], "reward", "u2", version=0)
    assert idx.try_get_batch("train", 2) is None
    b = idx.try_get_batch("train", 1)
    assert b is not None and b.rows == g1 and b.groups == [1, 1, 1]
    idx.mark_ready([g0[2]], "reward", "u2")
    b = idx.try_get_batch("train", 1)
    assert b is not None and b.rows == g0


async def test_waiter_is_woken_by_producer_and_timeout_leaves_nothing_leased() -> None:
    idx = grpo_index()
    (g,) = admit(idx, 1, 2)
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await idx.get_batch("train", 1)
    waiter = asyncio.create_task(idx.get_batch("train", 1))
    await asyncio.sleep(0)
    assert not waiter.done()
    idx.mark_ready(g, "reward", "u2")
    batch = await asyncio.wait_for(waiter, 1)
    assert batch.rows == g


async def test_cancelled_waiter_does_not_take_rows() -> None:
    idx = grpo_index()
    (g,) = admit(idx, 1, 2)
    w = asyncio.create_task(idx.get_batch("rollout", 2))  # needs 2 groups, only 1 exists
    await asyncio.sleep(0)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    b = idx.try_get_batch("rollout", 1)
    assert b is not None and b.rows == g


async def test_waiters_of_one_task_do_not_block_another() -> None:
    idx = grpo_index()
    starved = asyncio.create_task(idx.get_batch("train", 5))
    await asyncio.sleep(0)
    admit(idx, 1, 2)
    b = idx.try_get_batch("rollout", 1)
    assert b is not None
    assert not starved.done()
    starved.cancel()


async def test_requeue_gives_rows_back_in_order() -> None:
    idx = grpo_index()
    admit(idx, 3, 1)
    b = await idx.get_batch("rollout", 2)
    idx.requeue("rollout", b.rows)
    b2 = await idx.get_batch("rollout", 3)
    assert b2.rows == [0, 1, 2]
    with pytest.raises(ValueError, match="not leased"):
        idx.ack("reward", [0])


async def test_release_after_every_task_and_free_callback() -> None:
    freed: list[dict[str, list[int]]] = []
    idx = grpo_index(freed.append)
    (g,) = admit(idx, 1, 2)
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    b = await idx.get_batch("reward", 2)
    idx.complete("reward", b.rows, {"reward": ("u2", [], "float32", 0)})
    assert len(idx) == 2 and not freed
    b = await idx.get_batch("train", 1)
    idx.ack("train", b.rows)
    assert len(idx) == 0
    merged: dict[str, set[int]] = {}
    for f in freed:
        for unit, rows in f.items():
            merged.setdefault(unit, set()).update(rows)
    assert merged == {"dataset": set(g), "u1": set(g), "u2": set(g)}
    assert idx.resident_units() == {"dataset": 0, "u1": 0, "u2": 0}


async def test_lost_unit_recomputes_from_lineage() -> None:
    freed: list[dict[str, list[int]]] = []
    idx = grpo_index(freed.append)
    (g,) = admit(idx, 1, 2)
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    b = await idx.get_batch("reward", 2)
    idx.complete("reward", b.rows, {"reward": ("u2", [], "float32", 0)})
    lost = idx.mark_unit_lost("u1")
    assert lost == {"response": g}
    # the reward derived from the lost response is dropped too; its stale copy on u2 is freed
    # with the row (a free sent now could race the recomputed reward's put to u2)
    assert all("reward" not in idx.row_fields(r) for r in g)
    assert not freed
    assert idx.try_get_batch("train", 1) is None
    b = idx.try_get_batch("rollout", 1)  # rollout sees the group again
    assert b is not None and b.rows == g
    idx.complete("rollout", b.rows, {"response": ("u3", [3], "int64", 1)})
    b = idx.try_get_batch("reward", 2)
    assert b is not None
    idx.complete("reward", b.rows, {"reward": ("u2", [], "float32", 1)})
    b = idx.try_get_batch("train", 1)
    assert b is not None and b.rows == g
    assert {f.unit for f in b.fields["response"]} == {"u3"}
    idx.ack("train", b.rows)
    assert {u for f in freed for u in f} == {"dataset", "u2", "u3"}


async def test_stale_completion_after_loss_is_dropped() -> None:
    idx = grpo_index()
    (g,) = admit(idx, 1, 2)
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    scoring = await idx.get_batch("reward", 2)  # reward worker is busy with these
    idx.mark_unit_lost("u1")
    stale = idx.complete("reward", scoring.rows, {"reward": ("u2", [], "float32", 0)})
    assert stale == g
    assert all("reward" not in idx.row_fields(r) for r in g)


async def test_loss_after_all_consumers_done_needs_no_redo() -> None:
    idx = grpo_index()
    admit(idx, 1, 1)
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    b = await idx.get_batch("reward", 1)
    idx.complete("reward", b.rows, {"reward": ("u2", [], "float32", 0)})
    b = await idx.get_batch("train", 1)
    idx.ack("train", b.rows)  # released: loss of u1 later touches nothing
    assert idx.mark_unit_lost("u1") == {}


async def test_snapshot_restore_round_trip_and_leases_come_back() -> None:
    idx = grpo_index()
    admit(idx, 2, 2)
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, {"response": ("u1", [[3], [4]], "int64", 0)})
    leased = await idx.get_batch("reward", 1)  # in flight when the controller died
    snap = idx.snapshot()
    import json

    idx2 = SampleIndex.restore(json.loads(json.dumps(snap)))
    assert idx2.snapshot()["rows"] == snap["rows"]
    b2 = idx2.try_get_batch("reward", 2)
    assert b2 is not None and sorted(b2.rows) == sorted(b.rows)
    assert leased.rows[0] in b2.rows
    r2 = idx2.try_get_batch("rollout", 1)
    assert r2 is not None and r2.rows == [2, 3]
    assert idx2.add_group(1) == [4]
    assert idx2.row_fields(b.rows[1])["response"].shape == (4,)


async def test_rows_snapshotted_as_done_are_not_handed_out_after_restore() -> None:
    """A step's checkpoint is taken just before its rows are acknowledged: saved as done, they
    are neither generated again nor kept forever by the restored run."""
    import json

    idx = grpo_index()
    first, second = admit(idx, 2, 2)
    for _ in range(2):
        b = await idx.get_batch("rollout", 1)
        idx.complete("rollout", b.rows, {"response": ("u1", [[3], [4]], "int64", 0)})
    while (b := idx.try_get_batch("reward", 4)) is not None:
        idx.complete("reward", b.rows, {"reward": ("u2", [[]] * len(b.rows), "float32", -1)})
    trained = await idx.get_batch("train", 1)  # the step being committed
    assert trained.rows == first
    snap = json.loads(json.dumps(idx.snapshot(done=trained.rows)))
    idx2 = SampleIndex.restore(snap)
    for unit in list(idx2.resident_units()):
        if unit != "dataset":
            idx2.mark_unit_lost(unit)  # a resumed run's workers are new: recompute
    assert not any(r in idx2 for r in first)
    assert idx2.released_rows == idx.released_rows + 2
    again = idx2.try_get_batch("rollout", 2, at_least=1)
    assert again is not None and again.rows == second  # only the untrained group comes back
    assert idx2.try_get_batch("rollout", 1) is None


def test_register_errors_are_clear() -> None:
    idx = SampleIndex()
    idx.register_task("a", ["x"], ["y"])
    with pytest.raises(ValueError, match="already registered"):
        idx.register_task("a", ["x"])
    with pytest.raises(ValueError, match="produced by both"):
        idx.register_task("b", ["x"], ["y"])
    with pytest.raises(KeyError, match="unknown task"):
        idx.try_get_batch("nope", 1)
    with pytest.raises(KeyError, match="not registered"):
        idx.mark_ready([99], "x", "u")


async def test_million_rows_resident_get_is_constant_time() -> None:
    idx = SampleIndex()
    idx.register_task("train", ["x"])
    n = 1_000_000
    # bulk registration through groups of 1000 keeps the test quick
    for _ in range(n // 1000):
        rows = idx.add_group(1000)
        idx.mark_ready(rows, "x", "u", shapes=[4], dtype="int64")
    assert len(idx) == n
    b = await idx.get_batch("train", 256)
    assert b.rows == list(range(256))
    idx.ack("train", b.rows)
    assert len(idx) == n - 256


async def test_partitioned_task_takes_only_its_partition() -> None:
    idx = SampleIndex()
    idx.register_task("train", ["x"], groups=True, partition="step")
    g0 = idx.add_group(2, [{"step": 0}] * 2)
    g1 = idx.add_group(2, [{"step": 1}] * 2)
    idx.mark_ready(g1, "x", "u")  # step 1 is ready first
    assert idx.try_get_batch("train", 1, partition=0) is None
    waiter = asyncio.create_task(idx.get_batch("train", 1, partition=0))
    await asyncio.sleep(0)
    b1 = idx.try_get_batch("train", 1, partition=1)  # not blocked by step 0's waiter
    assert b1 is not None and b1.rows == g1
    idx.mark_ready(g0, "x", "u")
    b0 = await asyncio.wait_for(waiter, 1)
    assert b0.rows == g0
    plain = SampleIndex()
    plain.register_task("other", ["x"])
    with pytest.raises(ValueError, match="not partitioned"):
        plain.try_get_batch("other", 1, partition=3)


async def test_invalidate_sends_a_group_back_to_rollout() -> None:
    freed: list[dict[str, list[int]]] = []
    idx = grpo_index(freed.append)
    (g,) = admit(idx, 1, 2)
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    b = await idx.get_batch("reward", 2)
    idx.complete("reward", b.rows, {"reward": ("u2", [], "float32", 0)})
    idx.invalidate(g, ["response"])
    assert all(not ({"response", "reward"} & idx.row_fields(r).keys()) for r in g)
    assert not freed  # the stale copies go with the row, below
    b = idx.try_get_batch("rollout", 1)
    assert b is not None and b.rows == g
    idx.complete("rollout", b.rows, {"response": ("u3", [3], "int64", 1)})
    b = await idx.get_batch("reward", 2)
    idx.complete("reward", b.rows, {"reward": ("u2", [], "float32", 1)})
    b = await idx.get_batch("train", 1)
    idx.ack("train", b.rows)
    assert {u for f in freed for u in f} == {"dataset", "u1", "u2", "u3"}


async def test_loss_while_the_trainer_holds_a_row_trains_it_once() -> None:
    idx = grpo_index()
    admit(idx, 1, 2)
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    b = await idx.get_batch("reward", 2)
    idx.complete("reward", b.rows, {"reward": ("u2", [], "float32", 0)})
    training = await idx.get_batch("train", 1)  # the trainer pulled the data ...
    idx.mark_unit_lost("u2")  # ... then the reward worker died
    idx.ack("train", training.rows)  # its update used the old data: trained once
    b = idx.try_get_batch("reward", 2)  # the lost rewards are recomputed for the other tasks
    assert b is not None
    idx.complete("reward", b.rows, {"reward": ("u3", [], "float32", 0)})
    assert idx.try_get_batch("train", 1) is None  # but never trained again
    assert len(idx) == 0  # and every task has now consumed the group: released


async def test_at_least_takes_what_is_ready_up_to_n() -> None:
    """A streaming stage asks for up to n rows, at least one: it must not wait for a full batch
    when no more rows will come (the run's last group, a regenerated group)."""
    idx = grpo_index()
    admit(idx, 3, 2)
    with pytest.raises(ValueError, match="at_least"):
        await idx.get_batch("rollout", 2, at_least=3)
    waiting = asyncio.create_task(idx.get_batch("reward", 4, at_least=1))
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing ready: it waits
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    got = await asyncio.wait_for(waiting, 1)
    assert sorted(got.rows) == sorted(b.rows)  # the 2 ready rows, not a wait for 4
    b2 = await idx.get_batch("rollout", 2, at_least=1)  # both remaining groups are ready
    assert len(b2.rows) == 4
    idx.complete("rollout", b2.rows, {"response": ("u1", [3], "int64", 0)})
    full = idx.try_get_batch("reward", 3, at_least=1)
    assert full is not None and len(full.rows) == 3  # capped at n
    assert idx.try_get_batch("reward", 2) is None  # exact batches still wait for n
    rest = idx.try_get_batch("reward", 2, at_least=1)
    assert rest is not None and len(rest.rows) == 1


async def test_results_on_a_unit_lost_before_complete_are_not_produced() -> None:
    """A worker replies and dies; the supervisor marks its unit lost before the controller
    calls complete(). The fields would point at the dead unit, and every consumer would retry
    pulling from it until the run failed: they are not produced, the rows go back."""
    idx = grpo_index()
    (g,) = admit(idx, 1, 2)
    b = await idx.get_batch("rollout", 1)
    idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})
    scoring = await idx.get_batch("reward", 2)  # the reward worker on unit u2 has them
    idx.mark_unit_lost("u2")  # it replied, then died
    stale = idx.complete("reward", scoring.rows, {"reward": ("u2", [], "float32", 0)})
    assert sorted(stale) == g
    assert all("reward" not in idx.row_fields(r) for r in g)
    assert idx.resident_units().get("u2", 0) == 0
    assert idx.try_get_batch("train", 1) is None
    again = idx.try_get_batch("reward", 2)  # back for the replacement (unit u2.1)
    assert again is not None and sorted(again.rows) == g
    assert idx.complete("reward", again.rows, {"reward": ("u2.1", [], "float32", 0)}) == []
    train = idx.try_get_batch("train", 1)
    assert train is not None and {f.unit for f in train.fields["reward"]} == {"u2.1"}


async def test_group_results_on_a_lost_unit_send_the_whole_group_back() -> None:
    idx = grpo_index()
    (g,) = admit(idx, 1, 3)
    b = await idx.get_batch("rollout", 1)
    idx.mark_unit_lost("u1")
    assert sorted(idx.complete("rollout", b.rows, {"response": ("u1", [3], "int64", 0)})) == g
    assert idx.resident_units().get("u1", 0) == 0
    again = idx.try_get_batch("rollout", 1)
    assert again is not None and sorted(again.rows) == g


async def test_a_unit_name_that_comes_back_is_accepted_for_new_calls() -> None:
    """An attached worker restarted by its orchestrator comes back under the same unit name
    (and a resumed controller's workers reuse the old run's names): a call leased before the
    loss is not produced, one leased after it is, and mark_ready() takes the name again once
    unit_back() says so."""
    idx = grpo_index()
    g0, g1 = admit(idx, 2, 1)
    old = await idx.get_batch("rollout", 1)
    idx.mark_unit_lost("u1")
    new = await idx.get_batch("rollout", 1)  # leased after the loss: the new worker's call
    assert idx.complete("rollout", new.rows, {"response": ("u1", [3], "int64", 0)}) == []
    assert idx.complete("rollout", old.rows, {"response": ("u1", [3], "int64", 0)}) == old.rows
    assert idx.row_fields(new.rows[0])["response"].unit == "u1"
    assert "response" not in idx.row_fields(old.rows[0])
    idx.mark_unit_lost("u3")
    assert idx.mark_ready(g0, "reward", "u3") == g0  # skipped: u3 is lost
    assert "reward" not in idx.row_fields(g0[0])
    idx.unit_back("u3")
    assert idx.mark_ready(g0 + g1, "reward", "u3") == []
    assert idx.row_fields(g0[0])["reward"].unit == "u3"
