"""Options shared by several command groups, declared once as Annotated aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Seed = Annotated[int, typer.Option(help="Random seed (splits, folds, sampling): same seed, same output.")]
Workers = Annotated[
    int | None, typer.Option(help="Processes for image work; default: every core. 1 runs in-process.")
]
Progress = Annotated[bool, typer.Option(help="Show a progress bar on stderr (only on a terminal).")]
ShardDir = Annotated[Path, typer.Argument(help="A folder made by `fer-dist shard` (holds manifest.json).")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an earlier output of this same command (never anything else).")]
