"""A spawned worker never blocks on its stdout after the ready line, and gets the worker
environment defaults.

The controller reads a worker's stdout pipe only until the ready line; vLLM keeps logging there
(a warning per weight reload), and a full pipe (64 KiB) used to freeze the worker mid-reload.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from pathlib import Path

import torch

from asyncflow.controller.pool import WORKER_ENV_DEFAULTS, spawn_worker
from asyncflow.transfer.client import TransferClient
from asyncflow.transfer.storage import ColumnData

CHILD = """
import sys
from asyncflow.workers.server import stdout_to_stderr
print("ready", flush=True)
stdout_to_stderr()
for _ in range(64):
    print("x" * 4096, flush=True)  # 256 KiB: four times what an unread pipe holds
print("done", file=sys.stderr, flush=True)
"""


def test_output_after_ready_goes_to_the_log_not_the_pipe(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=err, cwd=os.getcwd()
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"  # then the parent stops reading
        assert proc.wait(timeout=60) == 0  # blocked forever before the fix
    text = log.read_text()
    assert text.count("x" * 4096) == 64 and text.endswith("done\n")
    proc.stdout.close()


async def test_spawned_worker_stdout_is_its_log(tmp_path: Path) -> None:
    h = await spawn_worker("storage", "su0", secrets.token_hex(8), log_dir=tmp_path)
    try:
        assert h.proc is not None
        fd1 = os.readlink(f"/proc/{h.proc.pid}/fd/1")
        assert fd1 == str(tmp_path / "su0.log")
        # and it got the worker environment defaults (unless this environment sets them)
        environ = Path(f"/proc/{h.proc.pid}/environ").read_bytes().split(b"\0")  # noqa: ASYNC240
        omp = os.environ.get("OMP_WAIT_POLICY", WORKER_ENV_DEFAULTS["OMP_WAIT_POLICY"])
        assert f"OMP_WAIT_POLICY={omp}".encode() in environ
        # glibc parses GLIBC_TUNABLES at start-up and cuts it at each ':' in place
        tunables = os.environ.get("GLIBC_TUNABLES", WORKER_ENV_DEFAULTS["GLIBC_TUNABLES"])
        first = tunables.split(":")[0]
        assert f"GLIBC_TUNABLES={first}".encode() in environ
    finally:
        await h.stop()


NOISY_REWARD = """
print("imported " + "i" * 100, flush=True)

def noisy(prompt, response, answer):
    for _ in range(64):
        print("x" * 4096, flush=True)  # 256 KiB a call: four times what an unread pipe holds
    return 1.0
"""


async def test_reward_function_prints_go_to_the_worker_log(tmp_path: Path) -> None:
    """A user reward function's output (at import and in its scorer processes, which the role
    starts before the ready line) lands in the worker's log; nothing holds the controller's
    pipe after the ready line, and the calls do not stall on a full pipe."""
    (tmp_path / "noisy_reward.py").write_text(NOISY_REWARD)
    token = secrets.token_hex(8)
    settings = {
        "function": "noisy_reward:noisy",
        "timeout_s": 10.0,
        "processes": 1,
        "data": {"train_size": 4},
    }
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    h = await spawn_worker("reward", "rw0", token, settings, env=env, log_dir=tmp_path / "logs")
    try:
        assert h.proc is not None and h.proc.stdout is not None and h.log_path is not None
        # every writer of the pipe let go of it: the controller's reader sees its end
        assert await asyncio.wait_for(h.proc.stdout.read(), 10) == b""
        rows = [0, 1]
        ids = torch.tensor([5, 6, 7], dtype=torch.int64)
        async with TransferClient({h.unit: h.url}, token) as client:
            shapes = await client.put(
                h.unit, rows, {"response_ids": ColumnData(ids, torch.tensor([2, 1]))}
            )
        batch = {
            "task": "reward",
            "rows": rows,
            "groups": [0, 0],
            "meta": [{"index": 0}, {"index": 1}],
            "fields": {"response_ids": [[h.unit, s, "int64", 0] for s in shapes["response_ids"]]},
        }
        out = await h.call("/v1/work/score", {"batch": batch, "units": {h.unit: h.url}})
        assert out["metrics"]["n_failed"] == 0, out["metrics"]["failed"]
        assert out["metrics"]["rewards"] == [1.0, 1.0]
    finally:
        await h.stop()
    text = h.log_path.read_text()
    assert "imported " + "i" * 100 in text
    assert text.count("x" * 4096) == 2 * 64
