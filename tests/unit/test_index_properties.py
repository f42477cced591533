"""Property-based tests of the sample index's invariants (hypothesis state machine).

Random interleavings of admission, rollout, reward, training, requeues (a consumer died) and
lost storage units (a producer died) must keep: no task holds a row twice; group tasks get whole
groups; a call's late reply counts only for the rows its lease still holds; a row is released
exactly when every task has consumed it; and, once the pipeline drains, every admitted row was
trained exactly once.
"""

from __future__ import annotations

import json

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from asyncflow.transfer.index import SampleIndex


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.released: set[int] = set()
        self.idx = SampleIndex(self._freed)
        self.idx.register_task("rollout", ["prompt"], ["response"], groups=True)
        self.idx.register_task("reward", ["response"], ["reward"])
        self.idx.register_task("train", ["response", "reward"], groups=True)
        self.admitted: set[int] = set()
        # task -> calls in flight: (rows, lease)
        self.leases: dict[str, list[tuple[list[int], int]]] = {
            "rollout": [],
            "reward": [],
            "train": [],
        }
        self.trained: list[int] = []
        self.unit_no = 0

    def _freed(self, by_unit: dict[str, list[int]]) -> None:
        for rows in by_unit.values():
            self.released.update(r for r in rows if r not in self.idx._rows)

    @rule(size=st.integers(1, 4))
    def admit(self, size: int) -> None:
        rows = self.idx.add_group(size)
        self.idx.mark_ready(rows, "prompt", "dataset")
        self.admitted.update(rows)

    def _held(self, task: str, rows: list[int], lease: int) -> list[int]:
        """``rows`` that ``lease`` still holds (a loss may have taken some back, and a newer
        call may hold them now)."""
        leased = self.idx._tasks[task].leased
        return [r for r in rows if (held := leased.get(r)) is not None and held.id == lease]

    @rule(task=st.sampled_from(["rollout", "reward", "train"]), n=st.integers(1, 3))
    def take(self, task: str, n: int) -> None:
        b = self.idx.try_get_batch(task, n)
        if b is None:
            return
        held = {r for rows, ls in self.leases[task] for r in self._held(task, rows, ls)}
        assert not held & set(b.rows), "a row was handed out twice"
        if task != "reward":
            for g in set(b.groups):
                assert sorted(r for r, gg in zip(b.rows, b.groups) if gg == g) == sorted(
                    self.idx.group_rows(g)
                )
        self.leases[task].append((b.rows, b.lease))

    @precondition(lambda self: any(self.leases.values()))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from([t for t, ls in self.leases.items() if ls]))
        rows, lease = self.leases[task].pop(data.draw(st.integers(0, len(self.leases[task]) - 1)))
        mine = set(self._held(task, rows, lease))
        if task == "rollout":
            self.unit_no += 1
            produced = {"response": (f"r{self.unit_no % 3}", [2], "i", 0)}
            stale = self.idx.complete(task, rows, produced, lease=lease)
        elif task == "reward":
            stale = self.idx.complete(task, rows, {"reward": ("scorer", [], "f", 0)}, lease=lease)
        else:
            stale = self.idx.ack("train", rows, lease=lease)
            self.trained += [r for r in rows if r in mine]
        assert set(rows) - set(stale) <= mine, "a stale lease's result was accepted"

    @precondition(lambda self: any(self.leases.values()))
    @rule(data=st.data())
    def consumer_died(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from([t for t, ls in self.leases.items() if ls]))
        rows, lease = self.leases[task].pop()
        self.idx.requeue(task, rows, lease=lease)

    @precondition(lambda self: any(self.leases.values()))
    @rule(data=st.data())
    def call_abandoned(self, data: st.DataObject) -> None:
        """The controller gave a call's rows back (it timed out) and retried them, but the
        worker may still reply: the call stays in flight, its late reply must count for nothing
        (and the retry's reply alone counts)."""
        task = data.draw(st.sampled_from([t for t, ls in self.leases.items() if ls]))
        rows, lease = self.leases[task][data.draw(st.integers(0, len(self.leases[task]) - 1))]
        self.idx.requeue(task, rows, lease=lease)
        self.take(task, data.draw(st.integers(1, 3)))

    @rule(unit=st.sampled_from(["r0", "r1", "r2", "scorer"]))
    def unit_lost(self, unit: str) -> None:
        self.idx.mark_unit_lost(unit)

    @invariant()
    def released_iff_all_consumed(self) -> None:
        for rid in self.released:
            assert rid not in self.idx._rows
        assert self.admitted == self.released | set(self.idx._rows)
        assert len(self.trained) == len(set(self.trained)), "a row was trained twice"

    def teardown(self) -> None:
        # Drain: finish everything in flight, then run every stage until nothing moves.
        for task in ("rollout", "reward", "train"):
            for rows, lease in self.leases[task]:
                self.idx.requeue(task, rows, lease=lease)
        for _ in range(1000):
            moved = False
            for task in ("rollout", "reward", "train"):
                b = self.idx.try_get_batch(task, 1)
                if b is None:
                    continue
                moved = True
                if task == "rollout":
                    self.idx.complete(task, b.rows, {"response": ("r0", [2], "i", 0)})
                elif task == "reward":
                    self.idx.complete(task, b.rows, {"reward": ("scorer", [], "f", 0)})
                else:
                    self.idx.ack(task, b.rows)
                    self.trained += b.rows
            if not moved:
                break
        assert sorted(self.trained) == sorted(self.admitted), "not every row trained once"
        assert len(self.idx) == 0


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


PPO_TASKS: dict[str, tuple[list[str], list[str], bool, str | None]] = {
    # name: (requires, produces, groups, partition) -- as stages.register_tasks declares PPO
    "rollout": (["prompt"], ["prompt_ids", "response_ids", "rollout_logprobs"], True, None),
    "reward": (["response_ids"], ["reward"], False, None),
    "values": (["prompt_ids", "response_ids"], ["values"], False, None),
    "gae": (["response_ids", "reward", "values"], ["advantages", "returns"], False, None),
    "critic_train": (["prompt_ids", "response_ids", "values", "returns"], [], True, "step"),
    "train": (["prompt_ids", "response_ids", "rollout_logprobs", "advantages"], [], True, "step"),
}
FINAL = ("critic_train", "train")
STEPS = (0, 1, 2)


class PPOIndexMachine(RuleBasedStateMachine):
    """PPO's graph: two final consumers (actor and critic) of step partitions, several workers
    whose storage units die (a replacement gets a new unit name; a re-attached worker keeps
    it) -- possibly after replying to a call not yet completed --, regenerated groups, and a
    controller restart (snapshot, restore, every worker's unit lost). Each call finishes or
    gives back its rows under its lease, also after newer calls took some of them: a stale
    call's results never count. Each trainer trains each admitted row exactly once, every row
    is released once both have, and no field points at a dead unit."""

    def __init__(self) -> None:
        super().__init__()
        self.released: set[int] = set()
        self.idx = self._new_index()
        self.admitted: set[int] = set()
        # task -> in-flight calls: (rows, storage unit of the worker that took them, lease)
        self.leases: dict[str, list[tuple[list[int], str, int]]] = {t: [] for t in PPO_TASKS}
        self.trained: dict[str, list[int]] = {t: [] for t in FINAL}
        self.generation = [0, 0, 0]  # worker slot -> replacements so far (its unit's name)
        self.dead: set[str] = set()  # units lost for good (their worker was replaced)

    def _new_index(self, state: dict[str, object] | None = None) -> SampleIndex:
        if state is not None:
            return SampleIndex.restore(state, self._freed)
        idx = SampleIndex(self._freed)
        for name, (requires, produces, groups, partition) in PPO_TASKS.items():
            idx.register_task(name, requires, produces, groups=groups, partition=partition)
        return idx

    def _freed(self, by_unit: dict[str, list[int]]) -> None:
        for rows in by_unit.values():
            self.released.update(r for r in rows if r not in self.idx._rows)

    def _unit(self, slot: int) -> str:
        return f"w{slot}.{self.generation[slot]}"

    def _held(self, task: str, rows: list[int], lease: int) -> set[int]:
        """``rows`` that ``lease`` still holds."""
        leased = self.idx._tasks[task].leased
        return {r for r in rows if (held := leased.get(r)) is not None and held.id == lease}

    def _finish(self, task: str, rows: list[int], unit: str, lease: int) -> None:
        mine = self._held(task, rows, lease)
        if task in FINAL:
            stale = self.idx.ack(task, rows, lease=lease)
            assert set(rows) - set(stale) == mine, "ack() acked a row its lease lost"
            self.trained[task] += [r for r in rows if r in mine]
        else:
            produced = {c: (unit, [2], "f", 0) for c in PPO_TASKS[task][1]}
            stale = self.idx.complete(task, rows, produced, lease=lease)
            assert set(rows) - set(stale) <= mine, "a stale lease's result was accepted"

    @rule(size=st.integers(1, 3), step=st.sampled_from(STEPS))
    def admit(self, size: int, step: int) -> None:
        rows = self.idx.add_group(size, [{"step": step}] * size)
        self.idx.mark_ready(rows, "prompt", "dataset")
        self.admitted.update(rows)

    def _ready(self) -> list[tuple[str, int | None]]:
        """(task, partition) pairs with something ready now."""
        out: list[tuple[str, int | None]] = []
        for name, t in sorted(self.idx._tasks.items()):
            for key, q in t.queues.items():
                if any(self.idx._valid(t, i) for i in q.queued):
                    out.append((name, key))
        return out

    @rule(data=st.data(), calls=st.integers(1, 8))
    def work(self, data: st.DataObject, calls: int) -> None:
        """Up to ``calls`` stage calls, each on a task with rows ready: a batch is leased and
        finished at once, or left in flight (finished or given back by a later rule)."""
        for _ in range(calls):
            ready = self._ready()
            if not ready:
                return
            task, part = data.draw(st.sampled_from(ready))
            n = data.draw(st.integers(1, 3))
            # what the calls in flight still hold (less what a loss took back meanwhile)
            held = {r for rows, _, ls in self.leases[task] for r in self._held(task, rows, ls)}
            b = self.idx.try_get_batch(task, n, partition=part, at_least=1)
            assert b is not None
            assert not held & set(b.rows), "a row was handed out twice"
            assert all(b.lease != ls for _, _, ls in self.leases[task]), "a lease id reused"
            # An older call naming these rows stays in flight: its reply is stale for them.
            if task in FINAL:
                assert not set(self.trained[task]) & set(b.rows), f"{task} got a trained row"
                assert all(m["step"] == part for m in b.meta), "a row of another step"
            if PPO_TASKS[task][2]:
                for g in set(b.groups):
                    mine = sorted(r for r, gg in zip(b.rows, b.groups) if gg == g)
                    assert mine == sorted(r for r in self.idx.group_rows(g) if r in self.idx)
            unit = self._unit(data.draw(st.integers(0, 2)))
            if data.draw(st.booleans()):
                self._finish(task, b.rows, unit, b.lease)
            else:
                self.leases[task].append((b.rows, unit, b.lease))

    @precondition(lambda self: any(self.leases.values()))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from([t for t, ls in self.leases.items() if ls]))
        rows, unit, lease = self.leases[task].pop(
            data.draw(st.integers(0, len(self.leases[task]) - 1))
        )
        self._finish(task, rows, unit, lease)  # its worker may have died since it replied

    @precondition(lambda self: any(self.leases.values()))
    @rule(data=st.data())
    def consumer_died(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from([t for t, ls in self.leases.items() if ls]))
        rows, _, lease = self.leases[task].pop(
            data.draw(st.integers(0, len(self.leases[task]) - 1))
        )
        others = {r for rs, _, ls in self.leases[task] for r in self._held(task, rs, ls)}
        self.idx.requeue(task, rows, only_leased=True, lease=lease)
        kept = {r for rs, _, ls in self.leases[task] for r in self._held(task, rs, ls)}
        assert kept == others, "a stale requeue gave back a newer call's rows"

    @precondition(lambda self: any(self.leases.values()))
    @rule(data=st.data())
    def call_abandoned(self, data: st.DataObject) -> None:
        """The controller gave a call's rows back (it timed out), but its worker may still
        reply: the call stays in flight, and its late reply must count for nothing."""
        task = data.draw(st.sampled_from([t for t, ls in self.leases.items() if ls]))
        rows, _, lease = self.leases[task][data.draw(st.integers(0, len(self.leases[task]) - 1))]
        self.idx.requeue(task, rows, only_leased=True, lease=lease)

    @rule(slot=st.integers(0, 2))
    def worker_died(self, slot: int) -> None:
        self.dead.add(self._unit(slot))
        self.idx.mark_unit_lost(self._unit(slot))
        self.generation[slot] += 1  # its replacement stores under a new unit name

    @rule(slot=st.integers(0, 2))
    def worker_reattached(self, slot: int) -> None:
        """An attached worker restarted by its orchestrator: same unit name, data gone."""
        self.idx.mark_unit_lost(self._unit(slot))

    @rule(data=st.data())
    def regenerate(self, data: st.DataObject) -> None:
        groups = sorted({self.idx._rows[r].group for r in self.idx._rows})
        if not groups:
            return
        members = [
            r for r in self.idx.group_rows(data.draw(st.sampled_from(groups))) if r in self.idx
        ]
        self.idx.invalidate(members, PPO_TASKS["rollout"][1])

    @rule()
    def controller_restarted(self) -> None:
        state = json.loads(json.dumps(self.idx.snapshot()))
        self.idx = self._new_index(state)
        self.leases = {t: [] for t in PPO_TASKS}  # the old run's consumers are gone
        for unit in list(self.idx.resident_units()):
            if unit != "dataset":
                self.idx.mark_unit_lost(unit)

    @invariant()
    def consistent(self) -> None:
        for rid in self.released:
            assert rid not in self.idx._rows
        assert self.admitted == self.released | set(self.idx._rows)
        for task in FINAL:
            assert len(self.trained[task]) == len(set(self.trained[task])), f"{task} twice"
        tasks = self.idx._tasks.values()
        for rid, row in self.idx._rows.items():
            assert row.acked_by == sum(rid in t.consumed for t in tasks)
            assert row.acked_by < len(PPO_TASKS), "every task consumed it, yet it is kept"
        for t in tasks:
            assert not set(t.leased) & t.consumed
        for row in self.idx._rows.values():
            assert not {f.unit for f in row.fields.values()} & self.dead, "data on a dead unit"
        assert not any(self.idx.resident_units().get(u) for u in self.dead)

    def teardown(self) -> None:
        for task, leases in self.leases.items():
            for rows, _, lease in leases:
                self.idx.requeue(task, rows, only_leased=True, lease=lease)
        for _ in range(200):
            moved = False
            for task, (_, _, _, partition) in PPO_TASKS.items():
                for step in STEPS if partition else (None,):
                    b = self.idx.try_get_batch(task, 4, partition=step, at_least=1)
                    if b is not None:
                        moved = True
                        self._finish(task, b.rows, "drain", b.lease)
            if not moved:
                break
        for task in FINAL:
            assert sorted(self.trained[task]) == sorted(self.admitted), f"{task}: not once each"
        assert len(self.idx) == 0, "rows kept after both trainers had them"
        assert self.released == self.admitted


TestPPOIndexMachine = PPOIndexMachine.TestCase
TestPPOIndexMachine.settings = settings(max_examples=500, stateful_step_count=50, deadline=None)
