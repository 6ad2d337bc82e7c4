"""Writing files and folders so that a reader never sees half of one: temp sibling, fsync, rename."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fer_dist.errors import FerDistError

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


def swap_in(tmp: Path, out: Path) -> None:
    """Put `tmp` at `out`; an existing `out` (checked to be replaceable) is renamed aside first and removed
    last, so a reader sees the old or the new output, never neither half."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        os.rename(tmp, out)  # POSIX rename replaces an empty folder
        return
    old = out.with_name(f"{tmp.name}-old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing an earlier one: readers see the old or the new.

    The caller has checked that `out` is its own earlier output (`fer_dist.outputs` does it for commands);
    a file or a link there is never replaced."""
    tmp, out = Path(tmp), Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FerDistError(f"{out}: exists and is not a folder; not replacing it")
    swap_in(tmp, out)


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temp sibling of `out` to fill; put in place of `out` when the block ends without an error."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; results are meant to be shared
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` (itself or an ancestor) that does not exist yet, or None."""
    path, missing = Path(path).absolute(), None
    while not path.exists():
        missing, path = path, path.parent
    return missing


@contextmanager
def removed_on_error(created: Path | None) -> Iterator[None]:
    """Remove `created` (a folder this process made, from first_missing) if the block raises: a run that
    fails its set-up leaves nothing behind, not an empty runs/<name>/checkpoints/."""
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)  # a write the disk refused


@contextmanager
def write_errors(what: str) -> Iterator[None]:
    """A write the disk refused (full, over quota, read-only) as one FerDistError line: `<what>: <reason>`.
    The callers write through temp siblings, so nothing half-written stays behind."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        raise FerDistError(f"{what}: {err.strerror}{where}") from None


# Work before the accelerator exists (the quick start's shards, compare, export): the launcher's RANK
# variable, read without importing torch.
def is_main_launch_process() -> bool:
    """Whether the launcher's RANK variable makes this global rank 0 (for work before the accelerator)."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_file(path: Path, timeout_s: float = 3600.0, poll_s: float = 0.5) -> None:
    """Block until `path` exists (another process is writing it), or FerDistError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise FerDistError(f"{path}: still missing after waiting {timeout_s:.0f} s for the main process")
        time.sleep(poll_s)
