"""``python -m asyncflow.workers --role ROLE``: one worker process.

Roles: ``storage`` (a bare storage unit), ``rollout``, ``reward``, ``reference``, ``actor``,
``critic``. Role settings come as JSON (``--settings '{...}'`` or ``--settings @file.json``);
the run's token from ``--token`` or the ``ASYNCFLOW_TOKEN`` environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

from asyncflow.transfer.storage import StorageUnit
from asyncflow.workers.server import Role, WorkerServer

ROLES = ("storage", "rollout", "reward", "reference", "actor", "critic")


def make_role(role: str, settings: dict[str, Any]) -> Role:
    """Build a role by name; engine imports happen here, only for the role that needs them."""
    if role == "storage":
        from asyncflow.workers.storage_role import StorageRole

        return StorageRole()
    if role == "rollout":
        from asyncflow.workers.rollout import RolloutRole

        return RolloutRole(settings)
    if role == "reward":
        from asyncflow.workers.reward import RewardRole

        return RewardRole(settings)
    if role in ("reference", "actor", "critic"):
        from asyncflow.workers.trainer import make_trainer_role

        return make_trainer_role(role, settings)
    raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m asyncflow.workers", description=__doc__)
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--name", default=None, help="storage unit name (default: ROLE-PID)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--token", default=os.environ.get("ASYNCFLOW_TOKEN"))
    p.add_argument("--settings", default="{}", help="role settings as JSON, or @path.json")
    p.add_argument("--max-body", type=int, default=1 << 30, help="largest request body, bytes")
    return p.parse_args(argv)


def load_settings(raw: str) -> dict[str, Any]:
    if raw.startswith("@"):
        with open(raw[1:], encoding="utf-8") as f:
            raw = f.read()
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("--settings must be a JSON object")
    return data


def pin(settings: dict[str, Any]) -> None:
    """Restrict this process (and the threads it starts) to ``settings["cpus"]``."""
    cpus = settings.get("cpus")
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, [int(c) for c in cpus])
        os.environ.setdefault("OMP_NUM_THREADS", str(len(cpus)))


async def amain(args: argparse.Namespace) -> None:
    if not args.token:
        raise SystemExit("a run token is required: --token or ASYNCFLOW_TOKEN")
    settings = load_settings(args.settings)
    pin(settings)
    role = make_role(args.role, settings)
    unit = StorageUnit(args.name or f"{args.role}-{os.getpid()}")
    server = WorkerServer(role, unit, args.token, args.host, args.port, args.max_body)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.serve()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        runner(amain(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
