"""``write_report``: everything in ``RUN_DIR/report/`` from one call.

The controller calls it at the end of a run (inside ``asyncio.to_thread``); people call it
through ``python -m asyncflow.report RUN_DIR``. The trace and the idle table need only the
standard library; the PNGs need matplotlib (the ``plots`` extra). Without matplotlib the
non-plot outputs are still written and a warning says the plots were skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from asyncflow.report.idle import write_idle
from asyncflow.report.run import Run, load_run
from asyncflow.report.trace import write_trace

__all__ = ["write_report"]

log = logging.getLogger(__name__)


def _write_plots(run: Run, out: Path, gantt_steps: list[int] | None) -> dict[str, Path]:
    """The PNGs; ``{}`` (and a warning) when matplotlib is not installed."""
    try:
        from asyncflow.report import plots
    except ImportError as e:
        log.warning("plots skipped: %s (install with `pip install asyncflow[plots]`)", e)
        return {}
    drawn = {
        "gantt": plots.plot_gantt(run, out / "gantt.png", gantt_steps),
        "curves": plots.plot_curves(run, out / "curves.png"),
        "throughput": plots.plot_throughput(run, out / "throughput.png"),
        "staleness": plots.plot_staleness(run, out / "staleness.png"),
    }
    return {k: p for k, p in drawn.items() if p is not None}


def write_report(
    run_dir: Path, gantt_steps: list[int] | None = None, plots: bool = True
) -> dict[str, Path]:
    """Write the report of ``run_dir`` into ``run_dir/report/``; returns name -> file written.

    Names: ``trace`` (trace.json), ``idle_md``, ``idle_json``, and, with matplotlib,
    ``gantt``, ``curves``, ``throughput``, ``staleness`` (a plot with nothing to draw, such as
    the curves of a run with no steps, is left out). ``gantt_steps`` picks the Gantt chart's
    steps (default: the three in the middle of the run). ``plots=False`` skips the PNGs.
    """
    run = load_run(Path(run_dir))
    out = run.dir / "report"
    out.mkdir(exist_ok=True)
    written = write_trace(run, out) | write_idle(run, out)
    if plots:
        written |= _write_plots(run, out, gantt_steps)
    return written
