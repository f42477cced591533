"""End-to-end: two workers of one role share the work, and a slower one should take less.

The claim under test (README "Scaling out", controller/stages.py): each stage hands every ready
batch to the least loaded worker of its role (fewest rows in flight, then the faster per row),
so a slower worker keeps its rows longer and takes fewer new ones (dynamic load balancing). When
stage loops were one per worker slot, the slowed worker took as many groups as at full speed
(48 of 80, slowed or not: whole steps went to the workers in turn). Two runs, each once per
module, several tests reading their outputs:

- ``pooled``: ``rollout.workers=2`` and ``reward.workers=2``, spawned by the controller;
- ``slowed``: two rollout workers started by hand (``python -m asyncflow.workers --role rollout
  --config ...``, as a person starts them) and attached by URL, the first one behind a small
  reverse proxy written here that forwards every request to the real worker and answers each
  ``POST /v1/work/generate`` only after :data:`DELAY_S`. The controller knows the slowed worker
  by the proxy's URL alone, so every request for it -- the controller's calls and the other
  workers' storage pulls -- goes through the proxy.

Assertions read the structured outputs (metrics.jsonl, samples.jsonl, spans.jsonl, summary.json)
and the proxy's request counts, never logs or wall-clock times.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from multidict import CIMultiDict

from asyncflow.config import Config, load_config
from asyncflow.controller.controller import Controller

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "tiny-grpo.yaml"
STEPS = 10
#: what the hand-started workers and the controller are both given (as test_multihost does)
#: eager vLLM: torch.compile of four engines on two cores cost more than the rest of the file
RUN_ARGS = [
    f"algorithm.steps={STEPS}",
    "eval.every=0",
    "eval.size=16",
    "run.seed=0",
    "rollout.vllm.enforce_eager=true",
]
DELAY_S = 0.4  #: added to every answer of the slowed worker's generate
GENERATE = ("POST", "/v1/work/generate")
PROXY_MAX_BODY = 256 << 20  #: the largest request body the proxy takes, bytes
PROXY_TIMEOUT_S = 300.0  #: the longest the proxy waits for the worker behind it
READY_S = 300.0  #: for a hand-started worker to print its ready line
#: request headers a proxy must not pass on as they are (hop-by-hop, or set anew)
HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def base_overrides(tmp: Path, name: str) -> list[str]:
    return [*RUN_ARGS, f"run.output_dir={tmp}", f"run.name={name}", "run.progress=false"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a hand-started worker and whatever it started)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[0] != "Z" and int(rest[3]) == sid:
            out.append(int(d.name))
    return out


# ---------------------------------------------------------------------- the outputs, checked
def rollout_rows(run_dir: Path, stage: str = "rollout") -> dict[str, int]:
    """Rows each worker ran in ``stage`` (spans.jsonl: one span per successful call)."""
    rows: collections.Counter[str] = collections.Counter()
    for s in jsonl(run_dir / "spans.jsonl"):
        if s["stage"] == stage:
            rows[s["worker"]] += s["rows"]
    return dict(rows)


def calls(run_dir: Path, stage: str) -> dict[str, int]:
    return dict(
        collections.Counter(
            s["worker"] for s in jsonl(run_dir / "spans.jsonl") if s["stage"] == stage
        )
    )


def check_trained_exactly_once(run_dir: Path, cfg: Config) -> None:
    """Every admitted sample trained once, in the step it was admitted for, whole groups."""
    samples = jsonl(run_dir / "samples.jsonl")
    per_step = cfg.rows_per_step
    assert per_step == cfg.algorithm.prompts_per_step * cfg.algorithm.samples_per_prompt
    assert len(samples) == STEPS * per_step
    rows = collections.Counter(s["row"] for s in samples)
    assert max(rows.values()) == 1, "a row was trained twice"
    keys = collections.Counter((s["step"], s["group"], s["sample"]) for s in samples)
    assert max(keys.values()) == 1, "a (step, group, sample) was trained twice"
    by_index = collections.Counter((s["step"], s["index"], s["sample"]) for s in samples)
    assert max(by_index.values()) == 1, "a (step, prompt, sample) was trained twice"
    steps = collections.Counter(s["step"] for s in samples)
    assert sorted(steps) == list(range(STEPS)) and set(steps.values()) == {per_step}
    for st in range(STEPS):
        groups = collections.Counter(s["group"] for s in samples if s["step"] == st)
        assert len(groups) == cfg.algorithm.prompts_per_step
        assert set(groups.values()) == {cfg.algorithm.samples_per_prompt}


def check_completed(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["reward_failures"] == 0, summary
    lines = jsonl(run_dir / "metrics.jsonl")
    assert [x["step"] for x in lines if "event" not in x] == list(range(STEPS))
    evals = [x for x in lines if x.get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, STEPS]  # eval.every=0: at the start and the end
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 and e["eval_n"] == 16 for e in evals), evals


# ---------------------------------------------------------------------- run 1: spawned, 2 + 2
@dataclass
class Pooled:
    cfg: Config
    summary: dict[str, Any]
    pids: list[int]


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> Pooled:
    tmp = tmp_path_factory.mktemp("pooled")
    cfg = load_config(
        None, [*base_overrides(tmp, "pooled"), "rollout.workers=2", "reward.workers=2"]
    )
    controller = Controller(cfg)
    summary = uvloop.run(controller.run())
    pids = [h.proc.pid for hs in controller.workers.values() for h in hs if h.proc]
    return Pooled(cfg, summary, pids)


def test_two_of_each_train_every_sample_exactly_once(pooled: Pooled) -> None:
    assert pooled.summary["steps"] == STEPS
    check_completed(pooled.cfg.run_dir)
    check_trained_exactly_once(pooled.cfg.run_dir, pooled.cfg)


def test_both_rollout_and_both_reward_workers_did_work(pooled: Pooled) -> None:
    run_dir, total = pooled.cfg.run_dir, STEPS * pooled.cfg.rows_per_step
    rollout, reward = rollout_rows(run_dir, "rollout"), rollout_rows(run_dir, "reward")
    # each worker's own spans, every one of them with rows, and each row generated and scored
    # exactly once between them (no fault here: no call was retried, no group regenerated)
    assert set(rollout) == {"rollout0", "rollout1"} and min(rollout.values()) > 0, rollout
    assert set(reward) == {"reward0", "reward1"} and min(reward.values()) > 0, reward
    assert sum(rollout.values()) == total and sum(reward.values()) == total, (rollout, reward)
    n = pooled.cfg.algorithm.samples_per_prompt
    assert all(r % n == 0 for r in rollout.values()), "a group was split between calls"
    # 2 spawned rollout + 2 reward + 1 actor, none left after run()
    assert len(pooled.pids) == 5 and not any(alive(p) for p in pooled.pids)


# ---------------------------------------------------------------------- run 2: one slowed
class DelayProxy:
    """A reverse proxy on 127.0.0.1 in front of one worker: forwards every request (method,
    path and query, headers including Authorization, body) and the worker's answer (status,
    headers, body), holding back the answer to :data:`GENERATE` by ``delay_s``. Bodies are
    bounded (:data:`PROXY_MAX_BODY`), so is the wait for the worker (:data:`PROXY_TIMEOUT_S`)."""

    def __init__(self, target: str, delay_s: float) -> None:
        self.target = target.rstrip("/")
        self.delay_s = delay_s
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=PROXY_TIMEOUT_S),
            connector=aiohttp.TCPConnector(limit=64),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=PROXY_MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP)
        async with self._session.request(
            request.method,
            self.target + request.rel_url.raw_path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as up:
            data = await up.read()
            status = up.status
            back = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in HOP)
        key = (request.method, request.path)
        self.requests[key] += 1
        if key == GENERATE:
            await asyncio.sleep(self.delay_s)
        return web.Response(body=data, status=status, headers=back)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


@dataclass
class HandWorker:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    url: str = ""

    def log_tail(self, n: int = 3000) -> str:
        return self.err.read_text(errors="replace")[-n:] if self.err.exists() else ""


def start_rollout(name: str, token: str, logs: Path) -> HandWorker:
    """``python -m asyncflow.workers --role rollout --config tiny-grpo.yaml RUN_ARGS`` in a
    session of its own (so whatever it starts can be found, and stopped, by that session)."""
    cmd = [
        sys.executable, "-m", "asyncflow.workers",
        "--role", "rollout", "--name", name, "--host", "127.0.0.1", "--port", "0",
        "--config", str(PRESET), *RUN_ARGS,
    ]  # fmt: skip
    env = {**os.environ, "ASYNCFLOW_TOKEN": token, "OMP_WAIT_POLICY": "PASSIVE"}
    out, err = logs / f"{name}.out", logs / f"{name}.log"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=ROOT, start_new_session=True)
    return HandWorker(name, proc, out, err)


def wait_ready(workers: list[HandWorker]) -> None:
    """Until each worker printed its ready line (bounded); its URL is in that line."""
    deadline = time.monotonic() + READY_S
    pending = list(workers)
    while pending:
        for w in list(pending):
            for line in w.out.read_text(errors="replace").splitlines():
                msg = json.loads(line) if line.startswith("{") else {}
                if msg.get("event") == "ready":
                    w.url = str(msg["url"])
                    pending.remove(w)
                    break
            else:
                if w.proc.poll() is not None:
                    pytest.fail(f"{w.name} exited with {w.proc.returncode}:\n{w.log_tail()}")
        if pending and time.monotonic() > deadline:
            pytest.fail(f"not ready after {READY_S:.0f} s: {[w.name for w in pending]}")
        time.sleep(0.2)


def stop_hand_workers(workers: list[HandWorker], grace_s: float = 30.0) -> list[int]:
    """SIGTERM each worker, wait (bounded) for its session to empty; SIGKILL, by pid, what is
    left. Returns the pids that were still alive after the grace period."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    left: list[int] = []
    for w in workers:
        while True:
            with_children = session_members(w.proc.pid)
            if w.proc.poll() is not None and not with_children:
                break
            if time.monotonic() > deadline:
                left += with_children
                break
            time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for w in workers:
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait(timeout=30)
    return left


@dataclass
class Slowed:
    cfg: Config
    summary: dict[str, Any]
    requests: dict[tuple[str, str], int]
    workers: list[HandWorker]
    left_after_sigterm: list[int]
    pids: list[int] = field(default_factory=list)  #: the controller's own spawned workers


async def drive_slowed(tmp: Path, token: str, slow: HandWorker, fast: HandWorker) -> Slowed:
    proxy = DelayProxy(slow.url, DELAY_S)
    await proxy.start()
    try:
        urls = json.dumps([proxy.url, fast.url])  # the slowed one is rollout0
        cfg = load_config(
            None,
            [
                *base_overrides(tmp, "slowed"),
                f"run.token={json.dumps(token)}",
                f"rollout.urls={urls}",
            ],
        )
        controller = Controller(cfg)
        try:
            summary = await controller.run()
        except BaseException:
            for w in (slow, fast):
                print(f"--- {w.name} log ---\n{w.log_tail()}", file=sys.stderr)
            raise
        pids = [h.proc.pid for hs in controller.workers.values() for h in hs if h.proc]
    finally:
        await proxy.close()
    return Slowed(cfg, summary, dict(proxy.requests), [slow, fast], [], pids)


@pytest.fixture(scope="module")
def slowed(tmp_path_factory: pytest.TempPathFactory) -> Slowed:
    tmp = tmp_path_factory.mktemp("slowed")
    logs = tmp / "hand-logs"
    logs.mkdir()
    token = secrets.token_hex(16)
    workers: list[HandWorker] = []
    try:
        workers = [start_rollout(n, token, logs) for n in ("slow", "fast")]  # engines start at once
        wait_ready(workers)
        result = uvloop.run(drive_slowed(tmp, token, *workers))
    finally:
        left = stop_hand_workers(workers)
    result.left_after_sigterm = left
    return result


def groups_per_worker(run_dir: Path, cfg: Config) -> dict[str, int]:
    n = cfg.algorithm.samples_per_prompt
    rows = rollout_rows(run_dir)
    assert all(r % n == 0 for r in rows.values()), f"a group was split between calls: {rows}"
    return {w: r // n for w, r in rows.items()}


def test_the_proxy_stands_in_front_of_rollout0_and_both_generate(slowed: Slowed) -> None:
    run_dir = slowed.cfg.run_dir
    groups = groups_per_worker(run_dir, slowed.cfg)
    assert set(groups) == {"rollout0", "rollout1"} and min(groups.values()) > 0, groups
    assert sum(groups.values()) == STEPS * slowed.cfg.algorithm.prompts_per_step, groups
    # the proxy forwarded each of rollout0's generate calls (one span per call) and nothing
    # reached rollout0 but through it: the other workers pulled its responses via the proxy
    assert slowed.requests.get(GENERATE, 0) == calls(run_dir, "rollout")["rollout0"], (
        slowed.requests
    )
    assert slowed.requests.get(("POST", "/v1/storage/get"), 0) > 0, slowed.requests
    assert slowed.requests.get(("GET", "/v1/info"), 0) > 0, slowed.requests  # the attach


def test_a_slowed_rollout_worker_generates_fewer_groups(slowed: Slowed) -> None:
    # rollout0 -- the slowed one -- is first in every tie (equal loads, no speed measured yet):
    # fewer groups for it can only come from its slowness
    groups = groups_per_worker(slowed.cfg.run_dir, slowed.cfg)
    print(f"groups generated per worker (rollout0 slowed by {DELAY_S} s a call): {groups}")
    assert groups["rollout0"] < groups["rollout1"], groups


def test_with_a_slowed_worker_every_sample_is_trained_exactly_once(slowed: Slowed) -> None:
    assert slowed.summary["steps"] == STEPS
    check_completed(slowed.cfg.run_dir)
    check_trained_exactly_once(slowed.cfg.run_dir, slowed.cfg)


def test_hand_started_workers_leave_no_process(slowed: Slowed) -> None:
    # SIGTERM stopped each hand-started worker and everything it started, within the grace
    assert slowed.left_after_sigterm == []
    assert all(w.proc.returncode is not None for w in slowed.workers)
    assert not any(session_members(w.proc.pid) for w in slowed.workers)
    # the controller's own workers (reward, actor) are gone too; attached ones are not its own
    assert len(slowed.pids) == 2 and not any(alive(p) for p in slowed.pids)
