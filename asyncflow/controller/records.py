"""What a run says about its steps: each step's line in ``metrics.jsonl``, and the summary.

A step's record (:meth:`StepRecords.record`) is made once its weight sync is done, from what the
step's trained samples saw (:meth:`StepRecords.trained`, which also appends them to
``samples.jsonl``), the actor's (and PPO critic's) answers and the sync's timings: ``step``,
``version``, ``time_s``, ``step_time_s`` (since the previous record; the first step's since
training started), ``reward_mean``, ``accuracy``, ``samples``, ``response_tokens``,
``samples_per_s``, ``tokens_per_s``, ``staleness_hist`` / ``_mean`` / ``_max``, ``sync_s`` and
its parts ``sync_send_s``, ``sync_recv_s``, ``sync_reload_s``, ``idle_frac`` per worker, the
actor's loss statistics it reports (:data:`ACTOR_KEYS`), ``value_loss`` (PPO),
``stage_time_s``, ``reward_failures`` (so far) and ``reward_errors`` (this step's new
messages); the step driver adds ``eval_*`` when an evaluation followed the step.

A record looks at its own window only: the spans that ended before it are forgotten once it is
made (``spans.jsonl`` keeps them all), so a step costs the same at step 10 as at step 10 000.

The summary (:func:`summarize`) reads ``metrics.jsonl`` back: a resumed run redoes the steps
after its checkpoint, so each step counts once, as it was last trained, and a step recovered
from a checkpoint (:func:`asyncflow.runlog.recovered_step_record`) counts without its time.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from asyncflow.controller.fleet import Fleet
from asyncflow.roles.ops import FinishResult
from asyncflow.runlog import RunLog, StepStats, busy_by_worker, mean

#: the actor's answer's metrics copied into a step's record, when it reports them
ACTOR_KEYS = (
    "loss",
    "pg_loss",
    "kl_loss",
    "entropy",
    "grad_norm",
    "clip_frac",
    "approx_kl_behaviour",
    "tis_weight_mean",
    "tis_weight_max",
    "tis_weight_min",
    "tis_truncated_frac",
    "ratio_mean",
    "lr",
    "trained_rows_frac",
)


class StepRecords:
    """Makes each step's record (``reward_failures``: the stage loops' list, read as it grows)."""

    def __init__(self, log: RunLog, fleet: Fleet, reward_failures: list[dict[str, Any]]) -> None:
        self.log = log
        self.fleet = fleet
        self.reward_failures = reward_failures
        self._stats: dict[int, StepStats] = {}
        self._last_end = 0.0  # when the previous record was made: a step's window starts there
        self._failures_logged = 0  # reward failures already shown in a record

    def start(self) -> None:
        """Step times start now (after start-up and the first evaluation)."""
        self._last_end = self.log.now()

    def trained(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Step ``step``'s samples entered an update: count them and write them down."""
        st = self._stats.setdefault(step, StepStats(step, self.log.now()))
        for rec in samples:
            st.rewards.append(rec["reward"])
            st.lags[step - rec["version"]] += 1
            st.response_tokens += int(rec["length"] or 0)
            st.samples += 1
        self.log.samples(samples)

    def record(
        self, step: int, outs: list[list[FinishResult]], sync: dict[str, Any]
    ) -> dict[str, Any]:
        """The record of step ``step``: ``outs`` are the trainer roles' answers (the actor's
        first), ``sync`` the timings of the weight sync after it."""
        log = self.log
        st = self._stats.pop(step, StepStats(step, log.now()))
        now = log.now()
        prev_end, self._last_end = self._last_end, now
        wall = max(now - prev_end, 1e-9)
        actor = outs[0][0].metrics
        lags = dict(sorted(st.lags.items()))
        busy = busy_by_worker(log.spans, prev_end, now)
        rec: dict[str, Any] = {
            "step": step,
            "version": outs[0][0].version,
            "time_s": now,
            "step_time_s": wall,
            "reward_mean": mean(st.rewards),
            "accuracy": mean([1.0 if r > 0 else 0.0 for r in st.rewards]),
            "samples": st.samples,
            "response_tokens": st.response_tokens,
            "samples_per_s": st.samples / wall,
            "tokens_per_s": st.response_tokens / wall,
            "staleness_hist": {str(k): v for k, v in lags.items()},
            "staleness_mean": (sum(k * v for k, v in lags.items()) / max(sum(lags.values()), 1)),
            "staleness_max": max(lags, default=0),
            "sync_s": sync["sync_s"],
            # the trainer's broadcast, the slowest engine's receive and its in-place reload
            "sync_send_s": sync.get("send_s", 0.0),
            "sync_recv_s": sync.get("recv_s", 0.0),
            "sync_reload_s": sync.get("reload_s", 0.0),
            "idle_frac": {
                n: round(1.0 - min(busy.get(n, 0.0) / wall, 1.0), 4) for n in self.fleet.names()
            },
        }
        rec.update({k: actor[k] for k in ACTOR_KEYS if k in actor})
        if len(outs) > 1:
            rec["value_loss"] = outs[1][0].metrics.get("loss")
        rec["stage_time_s"] = self._stage_times(prev_end, now)
        log.forget_spans(now)
        failures = self.reward_failures
        rec["reward_failures"] = len(failures)
        if fresh := failures[self._failures_logged :]:  # why, in the user's own words
            rec["reward_errors"] = sorted({f["error"] for f in fresh})[:3]
        self._failures_logged = len(failures)
        return rec

    def write(self, record: dict[str, Any]) -> None:
        """Append a step's record to ``metrics.jsonl`` (and hand it to the live views)."""
        self.log.metrics(record)

    def _stage_times(self, since: float, until: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.log.spans:
            if s.end >= since and s.start <= until:
                out[s.stage] = out.get(s.stage, 0.0) + (min(s.end, until) - max(s.start, since))
        return {k: round(v, 4) for k, v in out.items()}


def summarize(run_dir: Path) -> dict[str, Any]:
    """The run summary (``summary.json``) from the run's ``metrics.jsonl``."""
    lines = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    evals = [x for x in lines if x.get("event") == "eval"]
    # a resumed run redoes the steps after its checkpoint: count each step once, as it was
    # last trained (the dead run's records stay in metrics.jsonl, before the "resumed" event)
    by_step = {int(x["step"]): x for x in lines if "event" not in x}
    steps = [by_step[k] for k in sorted(by_step)]
    timed = [x for x in steps if not x.get("recovered")]  # see recovered_step_record
    total_samples = sum(x["samples"] for x in timed)
    total_tokens = sum(x["response_tokens"] for x in timed)
    train_time = sum(x["step_time_s"] for x in timed)
    # one step's batch reward is noisy (64 samples): compare the first and last tenths
    window = max(1, len(steps) // 10)
    rewards = [x["reward_mean"] for x in steps]
    return {
        "steps": len(steps),
        "eval_accuracy_start": evals[0]["eval_accuracy"] if evals else None,
        "eval_accuracy_end": evals[-1]["eval_accuracy"] if evals else None,
        "reward_first": mean(rewards[:window]) if steps else None,
        "reward_last": mean(rewards[-window:]) if steps else None,
        "reward_window_steps": window,
        "samples_per_s": total_samples / train_time if train_time else math.nan,
        "tokens_per_s": total_tokens / train_time if train_time else math.nan,
        "train_time_s": train_time,
        "staleness_max": max((x["staleness_max"] for x in steps), default=0),
        "reward_failures": max((x.get("reward_failures", 0) for x in steps), default=0),
        "run_dir": str(run_dir),
        "pid": os.getpid(),
    }
