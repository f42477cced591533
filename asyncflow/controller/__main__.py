"""``python -m asyncflow.controller [--config configs/X.yaml] [key.sub=value ...]``.

With no argument it runs the default: GRPO on the built-in arithmetic task with the built-in
tiny model, workers spawned locally, progress on the terminal, metrics in ``runs/tiny-grpo``.

SIGTERM (``docker stop``, ``kill``) stops the run after the current step: a checkpoint of that
step, the final evaluation, the summary, the workers stopped; exit status 0. A second SIGTERM,
or Ctrl-C, stops at once (status 143 / 130), still without leaving a worker behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from asyncflow.config import ConfigError, load_config
from asyncflow.controller.checkpoints import NoCheckpoint
from asyncflow.controller.controller import Controller
from asyncflow.controller.pool import WorkerError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m asyncflow.controller",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="a YAML preset (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.lr=1e-5")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue a run from its last checkpoint (its config.json is used; "
        "overrides still apply)",
    )
    return p.parse_args(argv)


async def run_until_done(controller: Controller) -> dict[str, Any]:
    """Run the controller; the first SIGTERM asks it to stop after the current step, a second
    one cancels the run."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_sigterm() -> None:
        if controller.stopping:
            print("second SIGTERM: stopping now", file=sys.stderr, flush=True)
            task.cancel()
        else:
            print(
                "SIGTERM: stopping after the current step (checkpoint, final evaluation, "
                "summary); send it again to stop at once",
                file=sys.stderr,
                flush=True,
            )
            controller.stop()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await controller.run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.json").is_file():
                raise ConfigError(f"{run_dir} is not a run directory (no config.json)")
            where = [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"]
            cfg = load_config(run_dir / "config.json", [*where, *args.overrides])
        else:
            cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_json(), indent=2))
        return 0
    if not sys.stderr.isatty():
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"progress": False})})
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        summary = runner(run_until_done(Controller(cfg, resume=args.resume is not None)))
    except (NoCheckpoint, ConfigError) as e:  # bad input found before any worker started
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:  # e.g. a worker that could not start: its log's end is in e
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; workers stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:  # a second SIGTERM
        print("terminated; workers stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
