"""asyncflow.report: what a finished run looks like, from its run directory alone.

Reads ``metrics.jsonl``, ``samples.jsonl``, ``spans.jsonl`` and ``config.json`` (written by
``asyncflow.runlog.RunLog``) and writes ``RUN_DIR/report/``:

- ``trace.json``: Chrome/Perfetto trace of every span (:mod:`asyncflow.report.trace`);
- ``idle.md`` / ``idle.json``: per-worker busy / waiting-for-data / waiting-for-weights
  seconds over the training window (:mod:`asyncflow.report.idle`, definitions there);
- ``gantt.png``, ``curves.png``, ``throughput.png``, ``staleness.png`` with matplotlib
  (:mod:`asyncflow.report.plots`).

``python -m asyncflow.report RUN_DIR`` or :func:`write_report`. The optional per-step
TensorBoard writer lives in :mod:`asyncflow.report.tensorboard`. Nothing here imports torch
or matplotlib at import time.
"""

from asyncflow.report.build import write_report

__all__ = ["write_report"]
