"""``python -m asyncflow.report RUN_DIR [--steps 10 11 12] [--no-plots]``: write RUN_DIR/report/."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from asyncflow.report.build import write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asyncflow.report", description=__doc__)
    ap.add_argument("run_dir", type=Path, help="a run directory (holds spans.jsonl, ...)")
    ap.add_argument(
        "--steps", type=int, nargs="+", help="steps for the Gantt chart (default: 3 middle)"
    )
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        written = write_report(args.run_dir, gantt_steps=args.steps, plots=not args.no_plots)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name:>10}  {path}")
    if not args.no_plots and not any(p.suffix == ".png" for p in written.values()):
        print("no plots written (matplotlib missing, or nothing to draw)", file=sys.stderr)
    idle = args.run_dir / "report" / "idle.md"
    print(idle.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
