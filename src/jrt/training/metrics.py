"""Training metrics: a JSONL file (one object per logged step, validation rows with ``val_loss``), a console
line, and TensorBoard scalars when ``tensorboard`` is installed. Only rank 0 creates one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jrt.jsonl import append_jsonl, read_jsonl, write_jsonl

METRICS_FILE = "metrics.jsonl"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop rows after ``last_step`` (written by a run that died after its last checkpoint) and a torn last line."""
    path = Path(path)
    if path.is_file():
        write_jsonl(path, [row for row in read_metrics(path) if int(row.get("step", 0)) <= last_step])


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics JSONL file (one torn-line rule for the project, see :mod:`jrt.jsonl`)."""
    return read_jsonl(path, required=("step",))


class MetricsLogger:
    """Appends rows to ``OUT/metrics.jsonl`` and mirrors scalars to TensorBoard (``OUT/tensorboard``)."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.path = Path(out_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                self._tb = None

    def log(self, row: dict[str, Any]) -> None:
        append_jsonl(self.path, row)
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}" if not key.startswith("val") else f"val/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
