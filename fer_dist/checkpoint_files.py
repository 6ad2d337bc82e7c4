"""Checkpoint files: what one folder holds, the atomic save protocol, keep the last k + best, loading for a
resume, RNG states. `fer_dist.checkpoint` decides what a run saves and how it resumes.

Layout under <run_dir>/checkpoints/:
  <tag>/state.pt          the trainer's named entries (model, optimizer, table, round, history, config, ...)
  <tag>/rng-rank<R>.pt    process R's RNG states (python, numpy, torch CPU, torch CUDA), restored by a resume
                          on as many processes; samples and augmentations never depend on them (keyed seeds)
  <tag>/meta.json         human-readable: tag, round, step, world size, best metric, time, version
  best/                   a copy (hard links) of the best tag's files
  index.json              the kept tags in save order: the explicit ordering pruning and resume use
  latest                  the newest complete tag, one line of text (not a symlink: shared filesystems)
  .tmp-*                  work in progress; anything with this prefix is a crash leftover, removed at the
                          next save and never read

Everything is loaded with torch.load(weights_only=True): a checkpoint cannot run code. So a state may hold
only tensors, numbers, strings, bytes, None, dtypes, devices and dicts/lists/tuples of those; save checks
that before writing anything.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator

from fer_dist import __version__
from fer_dist.dist import any_process
from fer_dist.errors import FerDistError
from fer_dist.files import TMP_PREFIX, WRITE_ERRNOS, fsync_dir, swap_in, write_text_atomic

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE = "state.pt"
META = "meta.json"
INDEX = "index.json"
LATEST = "latest"
BEST = "best"
TMP = TMP_PREFIX
INDEX_FORMAT = "fer-dist-checkpoints/1"
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# Exact types: numpy scalars subclass float (np.float64) and NamedTuples subclass tuple, and torch.load
# refuses both. Tensors (and Parameters) by isinstance.
_PLAIN = {int, float, bool, complex, str, bytes, bytearray, type(None), torch.dtype, torch.device, torch.Size}
_MAPPINGS = {dict, OrderedDict}
_SEQUENCES = {list, tuple, set}
T = TypeVar("T")


def rng_file(rank: int) -> str:
    """The name of process `rank`'s RNG file inside a checkpoint directory."""
    return f"rng-rank{rank}.pt"


# ---------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, CUDA if any) as weights_only-loadable data."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss float or None)
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),  # plain ints: numpy arrays need unsafe unpickling
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back RNG states from capture_rng (CUDA states for as many devices as both sides have)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


# ---------------------------------------------------------------- small file helpers


def _check_tag(tag: str) -> None:
    """FerDistError unless tag is a plain directory name that cannot collide with the layout's own files."""
    if not _TAG.match(tag) or tag in (BEST, LATEST, INDEX):
        raise FerDistError(f"checkpoint tag: {tag!r} must be letters, digits, '.', '_', '-' and not "
                           f"'{BEST}', '{LATEST}' or '{INDEX}'")


def _check_loadable(obj: Any, where: str = "state") -> None:
    """FerDistError naming the entry if obj holds anything torch.load(weights_only=True) would refuse."""
    kind = type(obj)
    if kind in _MAPPINGS:
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise FerDistError(f"checkpoint: {where} has a key of type {type(key).__name__}")
            _check_loadable(value, f"{where}[{key!r}]")
    elif kind in _SEQUENCES:
        for i, value in enumerate(obj):
            _check_loadable(value, f"{where}[{i}]")
    elif kind not in _PLAIN and not isinstance(obj, torch.Tensor):
        raise FerDistError(f"checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}; a "
                           "checkpoint holds only tensors, numbers, strings, None and lists/dicts of them")


def _save_torch(obj: Any, path: Path) -> None:
    """torch.save, flushed to disk."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    """Delete a file or directory tree if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _read_index(root: Path) -> dict[str, Any]:
    """The checkpoints index ({'tags': [...], 'best': tag | None}); empty when there is none yet."""
    path = root / INDEX
    if not path.exists():
        return {"format": INDEX_FORMAT, "tags": [], "best": None}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(index.get("tags"), list):
            raise ValueError("no list of tags")
    except (OSError, ValueError, AttributeError) as e:
        raise FerDistError(f"{path}: not a readable checkpoint index ({e})") from None
    return index


# ---------------------------------------------------------------- saving


def _agreed(accelerator: Accelerator, step: Callable[[], T], *, main_only: bool) -> T | None:
    """Run one save step, then agree across processes whether it failed; if so every rank raises.

    The agreement is a collective, so it is also the barrier between steps, and a failure on one rank
    (a full disk, a non-shared run_dir) cannot leave the others waiting at a barrier forever.
    """
    error: BaseException | None = None
    result = None
    if not main_only or accelerator.is_main_process:
        try:
            result = step()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = e
    if any_process(accelerator, error is not None):
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:  # a full disk: one line, no traceback
            where = f" ({error.filename})" if error.filename else ""
            raise FerDistError(f"checkpoint: cannot write it: {error.strerror or error}{where}; the previous "
                               "checkpoint is intact (resume=auto continues from it)") from None
        if error is not None:
            raise error
        raise FerDistError("checkpoint: saving failed on another process (see its error)")
    return result


def _prepare(root: Path, tmp: Path, state: dict[str, Any]) -> None:
    """Main process: check the state, clear crash leftovers, create the temporary directory."""
    _check_loadable(state)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f"{TMP}*"):
        _remove(leftover)
    tmp.mkdir()


def _appears(check: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Poll check() for a while: a network filesystem may show another node's new entries late."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _write_rng(tmp: Path, rank: int) -> None:
    """Every process: its RNG states into the temporary directory."""
    if not _appears(tmp.is_dir):
        raise FerDistError(f"checkpoint: rank {rank} cannot see {tmp}; run_dir must be on a filesystem "
                           "shared by every node")
    _save_torch(capture_rng(), tmp / rng_file(rank))


def _plain(value: Any) -> Any:
    """A JSON-friendly form of a meta value (0-d tensors become numbers)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _meta(tag: str, state: dict[str, Any], world: int, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """meta.json's content: round, step, best_metric from `extra`, else from the state's entries so named."""
    meta = {
        "tag": tag,
        "round": _plain(state.get("round")),
        "step": _plain(state.get("step")),
        "world_size": world,
        "best_metric": _plain(state.get("best_metric")),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fer_dist_version": __version__,
        "entries": sorted(map(str, state)),
    }
    meta.update({key: _plain(value) for key, value in (extra or {}).items()})
    return meta


def _link_or_copy_dir(src: Path, dest: Path) -> None:
    """dest as a new directory holding src's files, hard-linked where the filesystem allows."""
    dest.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, dest / f.name)
        except OSError:
            shutil.copy2(f, dest / f.name)
    fsync_dir(dest)


def _publish(root: Path, tmp: Path, tag: str, state: dict[str, Any], meta: dict[str, Any], keep_last: int,
             is_best: bool) -> None:
    """Main process: write state and meta, rename into place, update best, index and latest, prune."""
    index = _read_index(root)  # first: a bad index stops the save before anything moves

    def missing() -> list[int]:
        return [r for r in range(meta["world_size"]) if not (tmp / rng_file(r)).is_file()]

    if not _appears(lambda: not missing()):
        raise FerDistError(f"checkpoint: {tmp} lacks the RNG files of ranks {missing()}")
    _save_torch(state, tmp / STATE)
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    with open(tmp / META, "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(tmp)
    swap_in(tmp, root / tag)  # the old one aside as .tmp-<tag>-old: a crash leaves only .tmp- leftovers
    fsync_dir(root)
    tags = [t for t in index["tags"] if t != tag] + [tag]
    kept, pruned = tags[-keep_last:], tags[:-keep_last]
    if is_best:
        staged = root / f"{TMP}{BEST}"
        _link_or_copy_dir(root / tag, staged)
        swap_in(staged, root / BEST)
        fsync_dir(root)
        index["best"] = tag
    index.update(format=INDEX_FORMAT, tags=kept)
    write_text_atomic(root / INDEX, json.dumps(index, indent=2) + "\n")
    write_text_atomic(root / LATEST, tag + "\n")
    # After index and latest no longer name them: a crash here leaves stray directories, never a
    # pointer to a deleted one. best/ holds its own links, so pruning its tag keeps it whole.
    for old in pruned:
        _remove(root / old)


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    tag: str,
    state: dict[str, Any],
    *,
    keep_last: int = 3,
    is_best: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save `state` (read on the main process only) and every process's RNG under checkpoints/<tag>.

    Collective. Every rank writes its RNG file into checkpoints/.tmp-<tag>; the main process then
    writes state.pt and meta.json, renames the directory into place, updates best/ (if is_best),
    index.json and latest, and prunes to the last keep_last tags in save order (re-saving a tag moves
    it to the end). `meta` adds or overrides meta.json fields (round, step, best_metric, ...; JSON
    values). Returns checkpoints/<tag> on every rank, once it is complete.
    """
    _check_tag(tag)
    if keep_last < 1:
        raise FerDistError(f"checkpoint keep_last: must be at least 1, got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    tmp = root / f"{TMP}{tag}"
    world = accelerator.num_processes
    try:
        _agreed(accelerator, lambda: _prepare(root, tmp, state), main_only=True)
        _agreed(accelerator, lambda: _write_rng(tmp, accelerator.process_index), main_only=False)
        _agreed(accelerator, lambda: _publish(root, tmp, tag, state, _meta(tag, state, world, meta),
                                              keep_last, is_best), main_only=True)
    except Exception:
        if accelerator.is_main_process:  # no partial checkpoint left behind (latest still names the last)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / tag


# ---------------------------------------------------------------- loading


def _complete(path: Path) -> bool:
    """Whether a checkpoint directory holds its state and meta files."""
    return (path / STATE).is_file() and (path / META).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run (per `latest`, then index.json), or None."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    candidates = []
    if (root / LATEST).is_file():
        candidates.append((root / LATEST).read_text(encoding="utf-8").strip())
    candidates += reversed(_read_index(root)["tags"])
    for tag in candidates:
        if _TAG.match(tag) and _complete(root / tag):
            return root / tag
    return None


def _load(path: Path) -> Any:
    """torch.load with weights_only=True onto the CPU; FerDistError naming the file on any failure."""
    if not path.is_file():
        raise FerDistError(f"{path}: checkpoint file is missing")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"it pickles {found.group(1)}" if found else "more than tensors and plain data"
        raise FerDistError(f"{path}: not a loadable fer-dist checkpoint (weights_only refused it: "
                           f"{what})") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, a bad header, ...: all mean a bad file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FerDistError(f"{path}: not a loadable fer-dist checkpoint ({first_line})") from None


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint directory's meta.json."""
    file = Path(path) / META
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FerDistError(f"{file}: not a readable checkpoint meta file ({e})") from None


def load_checkpoint(path: Path, rank: int | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state, process `rank`'s RNG states) from a checkpoint directory; RNG None when `rank` is None or
    the rank has no file."""
    path = Path(path)
    state = _load(path / STATE)
    if not isinstance(state, dict):
        raise FerDistError(f"{path / STATE}: holds a {type(state).__name__}, not a dict of named entries")
    if rank is None:
        return state, None
    if not (path / rng_file(rank)).exists():
        world = read_meta(path).get("world_size") if (path / META).is_file() else "?"
        logger.warning("%s has no RNG state for rank %d (saved by %s processes): this rank's RNG is not "
                       "restored", path, rank, world)
        return state, None
    return state, load_rng(path, rank)


def load_rng(path: Path, rank: int) -> dict[str, Any]:
    """Process `rank`'s RNG states from a checkpoint directory (FerDistError if it has none)."""
    return _load(Path(path) / rng_file(rank))
