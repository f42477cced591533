"""Optional TensorBoard scalars for a run: ``RUN_DIR/tensorboard/``, one point per metric per step.

:class:`TensorBoardWriter` wraps ``torch.utils.tensorboard.SummaryWriter`` when the
``tensorboard`` package is importable and is a silent no-op otherwise, so the controller can
call it every step without caring. Numeric entries of a metrics record become scalars; one
level of nested dicts (``idle_frac``, ``stage_time_s``, ``staleness_hist``) becomes
``key/subkey``; eval records (``"event": "eval"``) go under ``eval/``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["TensorBoardWriter", "numeric_scalars"]

log = logging.getLogger(__name__)

SKIP = frozenset({"step", "event"})


def numeric_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Tag -> value for the finite numeric entries of ``record`` (bools and strings skipped)."""
    prefix = "eval/" if record.get("event") == "eval" else ""
    out: dict[str, float] = {}
    for k, v in record.items():
        if k in SKIP:
            continue
        items = v.items() if isinstance(v, dict) else [("", v)]
        for sub, x in items:
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
                continue
            out[f"{prefix}{k}/{sub}" if sub else f"{prefix}{k}"] = float(x)
    return out


class TensorBoardWriter:
    """Writes metrics records as TensorBoard scalars under ``run_dir/tensorboard``, if it can."""

    def __init__(self, run_dir: Path) -> None:
        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer: Any = None
        try:
            import tensorboard  # noqa: F401  (torch's writer needs it; fail fast here)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard not installed; TensorBoard scalars are off")
            return
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        """Add every numeric entry of ``record`` at ``step``; a no-op without tensorboard."""
        if self._writer is None:
            return
        for tag, value in numeric_scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
