"""The ``storage`` role: a worker that only hosts a storage unit (benchmarks, tests, and extra
capacity for a data plane that wants more memory than its producers have)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from asyncflow.workers.server import Op


class StorageRole:
    name = "storage"

    async def start(self) -> None:
        return None

    def ops(self) -> Mapping[str, Op]:
        return {}

    def info(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        return None
