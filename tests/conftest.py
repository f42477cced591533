"""Shared pytest set-up: keep torch to one thread per test process (CI has two cores)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass
