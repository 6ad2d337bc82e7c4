"""The run's metrics: one JSONL file (main process only), optional TensorBoard, one-line records on stderr."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from fer_dist.errors import FerDistError


def _plain(value: Any) -> Any:
    """JSON-safe: tensors and numpy scalars to numbers/lists, NaN to None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MetricsLog:
    """Appends records to `metrics.jsonl`; a no-op on processes other than the main one."""

    def __init__(self, path: Path, *, enabled: bool, tensorboard: bool = False):
        self.path = path
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise FerDistError("run.tensorboard: tensorboard is not installed "
                                   "(pip install 'fer-dist[tensorboard]')") from None
            self._tb = SummaryWriter(str(path.parent / "tensorboard"))

    def offset(self) -> int:
        """Bytes written so far: saved in checkpoints so a resume can drop records logged after it."""
        if self._file is None:
            return 0
        self._file.flush()
        # append mode: after a resume truncated the file, tell() still reports the old end until a write
        return self._file.seek(0, 2)

    @staticmethod
    def truncate(path: Path, offset: int) -> None:
        """Cut the file back to what it held when the checkpoint being resumed was written."""
        if path.exists() and path.stat().st_size > offset:
            with path.open("r+b") as f:
                f.truncate(offset)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One record: `{"kind": ..., "step": ..., **values}`."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **_plain(values)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def say(self, text: str) -> None:
        """A line for a person (and for SLURM logs): plain text, never wrapped."""
        if self.enabled:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close the file and TensorBoard writer."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
