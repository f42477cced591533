"""Property-based tests of the sample index's invariants (hypothesis state machine).

Random interleavings of admission, rollout, reward, training, requeues (a consumer died) and
lost storage units (a producer died) must keep: no task holds a row twice; group tasks get whole
groups; a row is released exactly when every task has consumed it; and, once the pipeline drains,
every admitted row was trained exactly once.
"""

from __future__ import annotations

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
        self.leases: dict[str, list[list[int]]] = {"rollout": [], "reward": [], "train": []}
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

    @rule(task=st.sampled_from(["rollout", "reward", "train"]), n=st.integers(1, 3))
    def take(self, task: str, n: int) -> None:
        b = self.idx.try_get_batch(task, n)
        if b is None:
            return
        held = {r for lease in self.leases[task] for r in lease}
        assert not held & set(b.rows), "a row was handed out twice"
        if task != "reward":
            for g in set(b.groups):
                assert sorted(r for r, gg in zip(b.rows, b.groups) if gg == g) == sorted(
                    self.idx.group_rows(g)
                )
        self.leases[task].append(b.rows)

    @precondition(lambda self: any(self.leases.values()))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from([t for t, ls in self.leases.items() if ls]))
        rows = self.leases[task].pop(data.draw(st.integers(0, len(self.leases[task]) - 1)))
        if task == "rollout":
            self.unit_no += 1
            self.idx.complete(task, rows, {"response": (f"r{self.unit_no % 3}", [2], "i", 0)})
        elif task == "reward":
            self.idx.complete(task, rows, {"reward": ("scorer", [], "f", 0)})
        else:
            live = [r for r in rows if r in self.idx._tasks["train"].leased]
            self.idx.ack("train", live)
            self.trained += live

    @precondition(lambda self: any(self.leases.values()))
    @rule(data=st.data())
    def consumer_died(self, data: st.DataObject) -> None:
        task = data.draw(st.sampled_from([t for t, ls in self.leases.items() if ls]))
        rows = self.leases[task].pop()
        live = [r for r in rows if r in self.idx._tasks[task].leased]
        self.idx.requeue(task, live)

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
            for rows in self.leases[task]:
                self.idx.requeue(task, [r for r in rows if r in self.idx._tasks[task].leased])
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
