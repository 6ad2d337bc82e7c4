"""Rich progress bars and the end-of-run summary, shown by the main process only."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

Loss = float | torch.Tensor | None  # a step's loss; a tensor is read (a host sync) only when it is shown


class Bar:
    """One task's handle: `advance(loss=...)` moves it and shows the latest loss, read twice a second at
    most (a device tensor's read waits for the step's kernels)."""

    READ_EVERY_S = 0.5

    def __init__(self, progress: RichProgress | None, task: int | None):
        self._progress, self._task = progress, task
        self._read_at, self._extra = 0.0, ""

    def advance(self, n: int = 1, loss: Loss = None, images_per_s: float | None = None) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if now - self._read_at >= self.READ_EVERY_S:
            self._read_at, self._extra = now, _extra(loss, images_per_s)
        self._progress.update(self._task, advance=n, extra=self._extra)


def _extra(loss: Loss, images_per_s: float | None) -> str:
    text = f"loss {float(loss):.4f}" if loss is not None else ""
    return text + (f"  {images_per_s:.0f} img/s" if images_per_s else "")


class PlainBar(Bar):
    """Where stderr is not a terminal (a SLURM log): one plain line every `every_s` seconds, so a long
    epoch is seen to move; rich's bar would print nothing there."""

    def __init__(self, name: str, total: int | None, completed: int, every_s: float):
        super().__init__(None, None)
        self.name, self.total, self.done, self.every_s = name, total, completed, every_s
        self._start_done, self._start = completed, time.monotonic()
        self._last = self._start

    def advance(self, n: int = 1, loss: Loss = None, images_per_s: float | None = None) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        parts = [f"[progress] {self.name}", f"step {self.done}" + (f"/{self.total}" if self.total else "")]
        if extra := _extra(loss, images_per_s):
            parts.append(extra)
        per_step = (now - self._start) / max(1, self.done - self._start_done)
        if self.total:
            parts.append(f"left {_clock(per_step * max(0, self.total - self.done))}")
        print("  ".join(parts), file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Progress bars on stderr for the main process (plain lines where it is not a terminal); a no-op
    elsewhere."""

    def __init__(self, *, enabled: bool, every_s: float = 30.0):
        self.enabled, self.every_s = enabled, every_s
        self.console = Console(stderr=True)

    @contextmanager
    def task(self, name: str, *, total: int | None, completed: int = 0) -> Iterator[Bar]:
        """A bar for one epoch or pass; removed when the pass ends (the log keeps the record)."""
        if not self.enabled:
            yield Bar(None, None)
            return
        if not self.console.is_terminal:
            yield PlainBar(name, total, completed, self.every_s)
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[extra]}")]
        with RichProgress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(name, total=total, completed=completed, extra="")
            yield Bar(progress, task)

    def summary(self, values: dict[str, Any]) -> None:
        """The end-of-run table."""
        if not self.enabled:
            return
        table = Table(title="fer-dist run summary", show_header=False)
        for key, value in values.items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        Console().print(table)
