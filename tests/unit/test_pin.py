"""Pinning a worker process to cores (``workers/__main__.py: pin``)."""

from __future__ import annotations

import subprocess
import sys


def test_pinned_worker_uses_one_torch_thread_per_core() -> None:
    """``pin`` sets torch's thread count to the cores it pins to; torch's default (every core
    of the machine) put two OpenMP threads on the rollout's one core and slowed vLLM's decode
    steps by a quarter."""
    code = (
        "from asyncflow.workers.__main__ import pin; pin([0]); "
        "import os, torch; print(torch.get_num_threads(), sorted(os.sched_getaffinity(0)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["1", "[0]"]
