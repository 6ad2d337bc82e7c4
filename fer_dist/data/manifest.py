"""The manifest of a shard folder: typed dataclasses, writing `manifest.json`, and reading it back checked.

`read_manifest` refuses a file of another format or with a missing or mistyped field in one line that
names the file and the field; splits come back in id order (train, val, test, then the others).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fer_dist.data.splits import split_order
from fer_dist.errors import FerDistError

FORMAT = "fer-dist-shards/1"
MANIFEST = "manifest.json"
DIGEST_CHARS = 8  # hex digits of a sample's CRC-32 in ShardInfo.sample_digests


@dataclass(frozen=True)
class ShardInfo:
    """One tar: its file name, sample count, first id (ids are contiguous), labelled count, checksums."""

    file: str
    count: int
    first_id: int
    labelled: int
    sha256: str
    sample_digests: str  # DIGEST_CHARS hex digits per sample, in id order

    @property
    def ids(self) -> range:
        """The ids this shard holds."""
        return range(self.first_id, self.first_id + self.count)


@dataclass(frozen=True)
class SplitInfo:
    """One split: counts, per-class counts (unlabelled under "unlabelled") and its shards in id order."""

    count: int
    labelled: int
    unlabelled: int
    class_counts: dict[str, int]
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class ImageSpec:
    """The stored faces' side length in pixels and channel count (1 grey, 3 RGB)."""

    size: int
    channels: int


@dataclass(frozen=True)
class Manifest:
    """Everything `manifest.json` holds; splits are in id order (train, val, test, then others)."""

    dataset: str
    classes: tuple[str, ...]
    num_ids: int
    image: ImageSpec
    splits: dict[str, SplitInfo]
    folds: int | None
    params: dict
    source: dict  # {"fingerprint": "sha256:...", "files": int}
    faces: dict  # {"detected": n, "fallback": n, "not_attempted": n}
    skipped: list[dict]  # [{"path": ..., "reason": ...}]
    created_by: str
    format: str = FORMAT

    def shards(self) -> list[tuple[str, ShardInfo]]:
        """Every (split, shard) in id order."""
        return [(name, s) for name, split in self.splits.items() for s in split.shards]


def manifest_dict(manifest: Manifest) -> dict:
    """The manifest as the JSON object `manifest.json` holds."""
    return {
        "format": manifest.format,
        "dataset": manifest.dataset,
        "classes": list(manifest.classes),
        "num_ids": manifest.num_ids,
        "image": {"size": manifest.image.size, "channels": manifest.image.channels},
        "splits": {
            name: {
                "count": s.count, "labelled": s.labelled, "unlabelled": s.unlabelled,
                "class_counts": dict(s.class_counts),
                "shards": [vars(shard).copy() for shard in s.shards],
            }
            for name, s in manifest.splits.items()
        },
        "folds": manifest.folds,
        "params": manifest.params,
        "source": manifest.source,
        "faces": manifest.faces,
        "skipped": manifest.skipped,
        "created_by": manifest.created_by,
    }


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write `manifest.json` (sorted keys, so equal manifests are equal bytes)."""
    text = json.dumps(manifest_dict(manifest), sort_keys=True, indent=1, ensure_ascii=True)
    (Path(directory) / MANIFEST).write_text(text + "\n", encoding="ascii")


class _Fields:
    """Typed access to a JSON object that raises one-line FerDistErrors naming the file and the field."""

    def __init__(self, path: Path, obj: object, where: str = "") -> None:
        self.path, self.where = path, where
        if not isinstance(obj, dict):
            self.fail(where or "manifest", "is not a JSON object")
        self.obj: dict = obj  # type: ignore[assignment]

    def fail(self, name: str, what: str) -> None:
        raise FerDistError(f"{self.path}: field {name!r} {what}")

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        name = f"{self.where}.{key}" if self.where else key
        if key not in self.obj:
            self.fail(name, "is missing")
        value = self.obj[key]
        # bool is an int in Python; a count given as `true` is still wrong.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            self.fail(name, f"should be {_kind_name(kind)}, not {type(value).__name__}")
        return value

    def sub(self, key: str) -> _Fields:
        return _Fields(self.path, self.get(key, dict), f"{self.where}.{key}" if self.where else key)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", dict: "an object", list: "a list", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def read_manifest(directory: Path) -> Manifest:
    """Read and check `<directory>/manifest.json`; a bad file raises a one-line FerDistError naming it."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise FerDistError(f"{directory}: no such shard folder (made by `fer-dist shard --out {directory}`)")
    if not path.is_file():
        raise FerDistError(f"{path}: no manifest (not a shard directory made by `fer-dist shard`?)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FerDistError(f"{path}: not valid JSON ({exc})") from None
    top = _Fields(path, obj)
    fmt = top.get("format", str)
    if fmt != FORMAT:
        raise FerDistError(f"{path}: format {fmt!r} is not {FORMAT!r} (made by another version of fer-dist?)")
    image = top.sub("image")
    splits = top.sub("splits")
    manifest = Manifest(
        dataset=top.get("dataset", str),
        classes=tuple(top.get("classes", list)),
        num_ids=top.get("num_ids", int),
        image=ImageSpec(image.get("size", int), image.get("channels", int)),
        # JSON keeps splits alphabetically (sorted keys); ids run train, val, test, then the others.
        splits={name: _read_split(splits.sub(name)) for name in split_order(splits.obj)},
        folds=top.get("folds", (int, type(None))),
        params=top.get("params", dict),
        source=top.get("source", dict),
        faces=top.get("faces", dict),
        skipped=top.get("skipped", list),
        created_by=top.get("created_by", str),
    )
    held = sum(info.count for _, info in manifest.shards())
    if manifest.num_ids != held:
        # every reader sizes its tables by num_ids: a wrong one must stop here, not as a huge allocation
        top.fail("num_ids", f"{manifest.num_ids}, but the shards hold {held} samples")
    return manifest


def _read_split(split: _Fields) -> SplitInfo:
    """One split's entry, shard by shard."""
    shards = []
    for i, entry in enumerate(split.get("shards", list)):
        f = _Fields(split.path, entry, f"{split.where}.shards[{i}]")
        shard = ShardInfo(*(f.get(k, kind) for k, kind in _SHARD_FIELDS))
        if Path(shard.file).name != shard.file or not shard.file.endswith(".tar") or shard.file[0] == ".":
            # Readers open <folder>/<file>: a path here could point them anywhere.
            f.fail(f"{f.where}.file", f"{shard.file!r} is not a tar file name inside the shard folder")
        if shard.count < 0 or shard.first_id < 0 or not 0 <= shard.labelled <= shard.count:
            f.fail(f"{f.where}", f"count {shard.count}, first_id {shard.first_id}, labelled {shard.labelled} "
                   "are not ids and counts")
        if len(shard.sample_digests) != shard.count * DIGEST_CHARS:
            f.fail(f"{f.where}.sample_digests", f"holds {len(shard.sample_digests)} hex digits, not "
                   f"{DIGEST_CHARS} for each of its {shard.count} samples")
        shards.append(shard)
    counts = split.sub("class_counts")
    return SplitInfo(
        count=split.get("count", int),
        labelled=split.get("labelled", int),
        unlabelled=split.get("unlabelled", int),
        class_counts={k: counts.get(k, int) for k in counts.obj},
        shards=tuple(shards),
    )


_SHARD_FIELDS: tuple[tuple[str, type], ...] = (
    ("file", str), ("count", int), ("first_id", int), ("labelled", int), ("sha256", str),
    ("sample_digests", str),
)
