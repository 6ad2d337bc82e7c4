"""Where a command may write: an output never replaces what that command did not write.

The rule, for every path a command writes (a result folder, a CSV, an ONNX file, a contact sheet):
- a missing path is written (its missing parent folders made, and removed again if the command fails);
- an existing one is refused in one line unless `--overwrite` is given;
- `--overwrite` replaces only an earlier output of the same command: a folder whose marker file
  (`.fer-dist-output.json`, written last into every result folder) names the command and lists every file
  in it, or a file this command recognises as its own; never a folder it did not make, one holding a file
  it did not write, or a file of another kind;
- everything is written under a temporary name beside the target and renamed into place when complete.

Checked twice: before any work (so bad input costs nothing) and again just before the rename (the folder
may have changed while the command ran). No heavy import here: the CLI checks paths before loading torch.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fer_dist import __version__
from fer_dist.errors import FerDistError
from fer_dist.files import TMP_PREFIX, first_missing, fsync_dir, swap_in

MARKER = ".fer-dist-output.json"
# Result folders written before the marker existed: recognised by their files alone (every entry must
# match), so that --overwrite can still replace them and nothing else.
LEGACY = {
    "eval": ("eval.json", ("eval.json", "confusion-*.png", "reliability-*.png")),
    "intensity": ("intensity.json", ("intensity.json", "intensity.png")),
    "compare": ("compare.json", ("compare.json", "compare.png")),
    "cv": ("cv.json", ("cv.json",)),
}
SHARD_MANIFEST = "manifest.json"
SHARD_FORMAT = "fer-dist-shards/1"
IMAGE_TAG = b"fer-dist inspect --sheet"  # a PNG tEXt chunk or a JPEG comment: marks a sheet as ours


def _show(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def folder_owner(path: Path) -> dict[str, Any] | None:
    """{"command", "files", "about"} of the fer-dist output in folder `path`, or None where none is known."""
    marker = _read_json(path / MARKER)
    if isinstance(marker, dict) and isinstance(marker.get("command"), str) \
            and isinstance(marker.get("files"), list):
        return {"command": marker["command"], "files": [*map(str, marker["files"]), MARKER],
                "about": str(marker.get("about") or "")}
    manifest = _read_json(path / SHARD_MANIFEST)
    if isinstance(manifest, dict) and manifest.get("format") == SHARD_FORMAT:
        try:
            shards = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
        except (KeyError, TypeError, AttributeError):
            shards = []
        return {"command": "shard", "files": [SHARD_MANIFEST, *map(str, shards)],
                "about": str(manifest.get("dataset") or "")}
    names = os.listdir(path)
    for command, (main, patterns) in LEGACY.items():
        if main in names and all(any(fnmatch.fnmatch(n, p) for p in patterns) for n in names):
            return {"command": command, "files": names, "about": ""}
    return None


def _check_parent(path: Path) -> None:
    """The folders above `path` are folders (or can be made) and the nearest existing one is writable."""
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise FerDistError(f"{path}: cannot write there: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FerDistError(f"{path}: cannot write there: {parent} is not writable")


def check_folder(path: Path, command: str, *, overwrite: bool, flag: str = "--out",
                 what: str | None = None) -> None:
    """Raise FerDistError (one line) unless folder output `path` of `command` may be written."""
    path = Path(path)
    what = what or f"fer-dist {command} output folder"
    if path.is_symlink():
        raise FerDistError(f"{path}: exists and is a symbolic link; not replacing it (choose another {flag})")
    if not path.exists():
        _check_parent(path)
        return
    if not path.is_dir():
        raise FerDistError(f"{path}: exists and is not a {what} (it is a file); not replacing it "
                           f"(choose another {flag})")
    names = os.listdir(path)
    if not names:
        _check_parent(path)
        return  # an empty folder (made for this output): filled, nothing in it is lost
    owner = folder_owner(path)
    if owner is None or owner["command"] != command:
        whose = f"`fer-dist {owner['command']}` wrote it" if owner else f"it holds {_show(names)}"
        raise FerDistError(f"{path}: exists and is not a {what} ({whose}); not replacing it "
                           f"(choose another {flag})")
    foreign = sorted(set(names) - set(owner["files"]))
    if foreign:
        raise FerDistError(f"{path}: exists and holds files `fer-dist {command}` did not write "
                           f"({_show(foreign)}); not replacing it (choose another {flag})")
    if not overwrite:
        about = f" of {owner['about']}" if owner["about"] else ""
        raise FerDistError(f"{path}: exists; pass --overwrite to replace it (an earlier `fer-dist "
                           f"{command}` output{about}), or choose another {flag}")


def check_file(path: Path, command: str, *, overwrite: bool, ours: Callable[[Path], bool],
               flag: str = "--out") -> None:
    """Raise FerDistError (one line) unless file output `path` of `command` may be written; `ours` says
    whether an existing file is an earlier output of `command`."""
    path = Path(path)
    if path.is_symlink():
        raise FerDistError(f"{path}: exists and is a symbolic link; not replacing it (choose another {flag})")
    if not path.exists():
        _check_parent(path)
        return
    if path.is_dir():
        raise FerDistError(f"{flag} {path}: is a folder; name a file (e.g. {path / 'out'}{path.suffix})")
    if not path.is_file() or not ours(path):
        raise FerDistError(f"{path}: exists and is not a `fer-dist {command}` output; not replacing it "
                           f"(choose another {flag})")
    if not overwrite:
        raise FerDistError(f"{path}: exists; pass --overwrite to replace it (an earlier `fer-dist {command}` "
                           f"output), or choose another {flag}")


def _made_parents(path: Path) -> Path | None:
    """Make `path`'s missing parent folders; the topmost one made (to remove on failure), or None."""
    top = first_missing(path.absolute().parent)
    if top is not None:
        path.absolute().parent.mkdir(parents=True)
    return top


@contextmanager
def written_folder(out: Path, command: str, *, overwrite: bool, about: str = "",
                   flag: str = "--out") -> Iterator[Path]:
    """A temp folder beside `out` to fill; on success the marker is added and it takes `out`'s place."""
    out = Path(out)
    check_folder(out, command, overwrite=overwrite, flag=flag)
    made = _made_parents(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
        try:
            yield tmp
            files = sorted(os.listdir(tmp))
            marker = {"command": command, "about": about, "files": files,
                      "created_by": f"fer-dist {__version__}"}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; results are meant to be shared
            check_folder(out, command, overwrite=overwrite, flag=flag)  # it may have changed meanwhile
            swap_in(tmp, out)
            fsync_dir(out.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already on success
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


@contextmanager
def written_file(out: Path, command: str, *, overwrite: bool, ours: Callable[[Path], bool],
                 flag: str = "--out") -> Iterator[Path]:
    """A temp path beside `out` to write; renamed to `out` when the block ends without an error."""
    out = Path(out)
    check_file(out, command, overwrite=overwrite, ours=ours, flag=flag)
    made = _made_parents(out)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o644)
        check_file(out, command, overwrite=overwrite, ours=ours, flag=flag)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def tag_image(data: bytes, suffix: str) -> bytes:
    """PNG or JPEG bytes with IMAGE_TAG added (a tEXt chunk after IHDR; a comment after SOI)."""
    if suffix.lower() == ".png":
        body = b"Software\0" + IMAGE_TAG
        chunk = len(body).to_bytes(4, "big") + b"tEXt" + body + zlib.crc32(b"tEXt" + body).to_bytes(4, "big")
        end_of_ihdr = 8 + 4 + 4 + 13 + 4  # signature, IHDR length, type, data, CRC
        return data[:end_of_ihdr] + chunk + data[end_of_ihdr:]
    return data[:2] + b"\xff\xfe" + (len(IMAGE_TAG) + 2).to_bytes(2, "big") + IMAGE_TAG + data[2:]


def is_tagged_image(path: Path) -> bool:
    """Whether `path` is a contact sheet fer-dist wrote (IMAGE_TAG near its start)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return IMAGE_TAG in head
