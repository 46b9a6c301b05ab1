"""TensorBoard event files beside each run's ``metrics.jsonl``: ``tensorboard --logdir runs`` shows every stage.

The trainer hands each logged record here (:meth:`EventLog.write`): training scalars (the loss and its parts:
distillation, self-learning, InfoNCE; alpha; the spread of the per-sample weights; the learning rate; the
teacher's statistics) go under ``train/``, an evaluation's metrics (val RSUM, R@1, ...) under ``val/``, each at
its optimiser step. Every stage folder is its own TensorBoard run, so a sweep's students sit side by side.
Without the ``tensorboard`` package the trainer still writes ``metrics.jsonl`` and says once what is missing.
"""
from __future__ import annotations

import logging
import numbers
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)

__all__ = ["EventLog"]

#: record fields that are positions, not measurements
POSITION = ("step", "epoch", "elapsed_s")
_said_missing = False


class EventLog:
    """Writes a run's records as TensorBoard scalars into ``directory`` (opened on the first record)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._writer: Optional[Any] = None

    def _open(self):
        global _said_missing
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # the package is a dependency; an environment without it still trains
                if not _said_missing:
                    log.warning("no TensorBoard event files: %s (pip install tensorboard)", err)
                    _said_missing = True
                return None
            self.directory.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.directory))
        return self._writer

    def write(self, record: Dict[str, Any]) -> None:
        writer = self._open()
        if writer is None or "step" not in record:
            return
        step = int(record["step"])
        for key, value in record.items():
            if key == "eval" and isinstance(value, dict):
                for name, metric in value.items():
                    if _is_number(metric):
                        writer.add_scalar(f"val/{name}", float(metric), step)
            elif key not in POSITION and _is_number(value):
                writer.add_scalar(f"train/{key}", float(value), step)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
