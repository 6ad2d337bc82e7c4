"""Rich progress bars and the end-of-run summary, shown by the main process only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table


class Bar:
    """One task's handle: `advance(loss=...)` moves it and shows the last loss."""

    def __init__(self, progress: RichProgress | None, task: int | None):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, loss: float | None = None, images_per_s: float | None = None) -> None:
        if self._progress is not None:
            extra = f"loss {loss:.4f}" if loss is not None else ""
            extra += f"  {images_per_s:.0f} img/s" if images_per_s else ""
            self._progress.update(self._task, advance=n, extra=extra)


class Progress:
    """Progress bars on stderr for the main process; a no-op elsewhere."""

    def __init__(self, *, enabled: bool):
        self.enabled = enabled
        self.console = Console(stderr=True)

    @contextmanager
    def task(self, name: str, *, total: int | None, completed: int = 0) -> Iterator[Bar]:
        """A bar for one epoch or pass; removed when the pass ends (the log keeps the record)."""
        if not self.enabled or not self.console.is_terminal:
            yield Bar(None, None)
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
