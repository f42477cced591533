"""A spawned worker never blocks on its stdout after the ready line, and gets the worker
environment defaults.

The controller reads a worker's stdout pipe only until the ready line; vLLM keeps logging there
(a warning per weight reload), and a full pipe (64 KiB) used to freeze the worker mid-reload.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from asyncflow.controller.pool import WORKER_ENV_DEFAULTS, spawn_worker

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
