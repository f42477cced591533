"""``python -m asyncflow.workers --role ROLE``: one worker process.

Roles: ``storage`` (a bare storage unit), ``rollout``, ``reward``, ``reference``, ``actor``,
``critic``. Role settings come from the run's config, as the controller would build them
(``--config configs/X.yaml key.sub=value ...``: the same preset and overrides the controller is
given), and/or as JSON (``--settings '{...}'`` or ``--settings @file.json``), which is merged on
top. The run's token comes from ``--token``, the ``ASYNCFLOW_TOKEN`` environment variable or the
config's ``run.token``.

A worker started by hand for a controller that attaches it by URL::

    ASYNCFLOW_TOKEN=... python -m asyncflow.workers --role rollout --host 0.0.0.0 --port 8000 \\
        --config configs/tiny-grpo.yaml rollout.engine=transformers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

from asyncflow.config import Config, ConfigError, load_config
from asyncflow.roles.settings import (
    ActorSettings,
    CriticSettings,
    ReferenceSettings,
    RewardSettings,
    RoleSettings,
    RolloutSettings,
    parse_settings,
)
from asyncflow.transfer.storage import StorageUnit
from asyncflow.workers.server import Role, WorkerServer, detach_stdout

ROLES = ("storage", "rollout", "reward", "reference", "actor", "critic")


def make_role(role: str, settings: RoleSettings | None) -> Role:
    """Build a role by name; engine imports happen here, only for the role that needs them."""
    if role == "storage":
        from asyncflow.workers.storage_role import StorageRole

        return StorageRole()
    if isinstance(settings, RolloutSettings):
        from asyncflow.workers.rollout import RolloutRole

        return RolloutRole(settings)
    if isinstance(settings, RewardSettings):
        from asyncflow.workers.reward import RewardRole

        return RewardRole(settings)
    if isinstance(settings, ActorSettings | ReferenceSettings | CriticSettings):
        from asyncflow.workers.trainer import make_trainer_role

        return make_trainer_role(settings)
    raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m asyncflow.workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--name", default=None, help="storage unit name (default: ROLE-PID)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--token", default=os.environ.get("ASYNCFLOW_TOKEN"))
    p.add_argument(
        "--config",
        default=None,
        help="build the role's settings from this YAML preset (plus OVERRIDES), as the controller"
        " does",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDES",
        help="dotted config overrides, e.g. rollout.engine=transformers (imply the config tree)",
    )
    p.add_argument(
        "--settings",
        default="{}",
        help="role settings as JSON, or @path.json (merged over the config's)",
    )
    p.add_argument("--max-body", type=int, default=1 << 30, help="largest request body, bytes")
    return p.parse_args(argv)


def load_settings(raw: str) -> dict[str, Any]:
    if raw.startswith("@"):
        with open(raw[1:], encoding="utf-8") as f:
            raw = f.read()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --settings is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit("error: --settings must be a JSON object")
    return data


def resolve_settings(args: argparse.Namespace) -> tuple[RoleSettings | None, Config | None]:
    """The role's typed settings: from the config tree (``--config`` and overrides; the default
    config without them), then ``--settings`` merged on top, validated.

    Returns the settings (``None`` for a bare storage unit, which has none) and the config
    (``None`` when neither ``--config`` nor overrides were given: then the JSON alone, as when
    the controller spawns the worker with complete settings).
    """
    explicit = load_settings(args.settings)
    cfg = None
    if args.config is not None or args.overrides:
        cfg = load_config(args.config, args.overrides)
    if args.role == "storage":
        return None, cfg
    return parse_settings(args.role, explicit, cfg), cfg


def pin(cpus: list[int] | None) -> None:
    """Restrict this process (and the threads it starts) to ``cpus``."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, [int(c) for c in cpus])
        os.environ.setdefault("OMP_NUM_THREADS", str(len(cpus)))
        import torch

        torch.set_num_threads(len(cpus))


async def amain(args: argparse.Namespace) -> None:
    try:
        settings, cfg = resolve_settings(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    token = args.token or (cfg.run.token if cfg is not None else None)
    if not token:
        raise SystemExit("a run token is required: --token, ASYNCFLOW_TOKEN or run.token")
    # From here on stdout is the worker's log: what the role prints while it is built and
    # started (a reward function at import, its scorer processes) never reaches the controller's
    # pipe, which keeps only the ready line
    ready_out = detach_stdout()
    pin(settings.cpus if settings is not None else None)
    role = make_role(args.role, settings)
    unit = StorageUnit(args.name or f"{args.role}-{os.getpid()}")
    server = WorkerServer(
        role, unit, token, args.host, args.port, args.max_body, ready_out=ready_out
    )
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
