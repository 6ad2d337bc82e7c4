"""Writing small files so that a reader never sees half of one: temp sibling, fsync, rename."""

from __future__ import annotations

import os
from pathlib import Path

TMP_PREFIX = ".tmp-"  # temporary siblings start with it; checkpoint listing and clean-up skip such names


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path`'s content in one step: a `.tmp-` sibling, fsync, os.replace, fsync the folder."""
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
