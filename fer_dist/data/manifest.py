"""The manifest of a shard folder: typed (pydantic dataclasses), writing `manifest.json`, and reading it back
checked.

`read_manifest` refuses a file of another format or with a missing or mistyped field in one line that
names the file and the field; splits come back in id order (train, val, test, then the others).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, StrictInt, StrictStr, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from fer_dist.data.splits import split_order
from fer_dist.errors import FerDistError

FORMAT = "fer-dist-shards/1"
MANIFEST = "manifest.json"
DIGEST_CHARS = 8  # hex digits of a sample's CRC-32 in ShardInfo.sample_digests

# Pydantic dataclasses, not BaseModels: the writers build them positionally, one per shard, as before.
# Strict ints and strings: a count given as "5" or true is wrong; JSON's lists still read as tuples.
_FROZEN = {"frozen": True, "config": ConfigDict(extra="ignore")}


@dataclass(**_FROZEN)
class ShardInfo:
    """One tar: its file name, sample count, first id (ids are contiguous), labelled count, checksums."""

    file: StrictStr
    count: StrictInt
    first_id: StrictInt
    labelled: StrictInt
    sha256: StrictStr
    sample_digests: StrictStr  # DIGEST_CHARS hex digits per sample, in id order

    @property
    def ids(self) -> range:
        """The ids this shard holds."""
        return range(self.first_id, self.first_id + self.count)


@dataclass(**_FROZEN)
class SplitInfo:
    """One split: counts, per-class counts (unlabelled under "unlabelled") and its shards in id order."""

    count: StrictInt
    labelled: StrictInt
    unlabelled: StrictInt
    class_counts: dict[StrictStr, StrictInt]
    shards: tuple[ShardInfo, ...]


@dataclass(**_FROZEN)
class ImageSpec:
    """The stored faces' side length in pixels and channel count (1 grey, 3 RGB)."""

    size: StrictInt
    channels: StrictInt


@dataclass(**_FROZEN)
class Manifest:
    """Everything `manifest.json` holds; splits are in id order (train, val, test, then others)."""

    dataset: StrictStr
    classes: tuple[StrictStr, ...]
    num_ids: StrictInt
    image: ImageSpec
    splits: dict[StrictStr, SplitInfo]
    folds: StrictInt | None
    params: dict[str, Any]
    source: dict[str, Any]  # {"fingerprint": "sha256:...", "files": int}
    faces: dict[str, Any]  # {"detected": n, "fallback": n, "not_attempted": n}
    skipped: list[dict[str, Any]]  # [{"path": ..., "reason": ...}]
    created_by: StrictStr
    format: StrictStr = FORMAT

    def shards(self) -> list[tuple[str, ShardInfo]]:
        """Every (split, shard) in id order."""
        return [(name, s) for name, split in self.splits.items() for s in split.shards]


_MANIFEST = TypeAdapter(Manifest)


def manifest_dict(manifest: Manifest) -> dict:
    """The manifest as the JSON object `manifest.json` holds."""
    return _MANIFEST.dump_python(manifest, mode="json")


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write `manifest.json` (sorted keys, so equal manifests are equal bytes)."""
    text = json.dumps(manifest_dict(manifest), sort_keys=True, indent=1, ensure_ascii=True)
    (Path(directory) / MANIFEST).write_text(text + "\n", encoding="ascii")


_KINDS = {"int_type": "an integer", "string_type": "a string", "dict_type": "an object",
          "dataclass_type": "an object", "list_type": "a list", "tuple_type": "a list"}


def _field_error(path: Path, err: ValidationError) -> FerDistError:
    """The first problem as one line naming the file and the field (`splits.train.shards[0].count`)."""
    first = err.errors()[0]
    name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    if first["type"] == "missing":
        what = "is missing"
    elif first["type"] in _KINDS:
        what = f"should be {_KINDS[first['type']]}, not {type(first['input']).__name__}"
    else:
        what = f"{first['msg'][0].lower()}{first['msg'][1:]}"
    return FerDistError(f"{path}: field {name or 'manifest'!r} {what}")


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
    if not isinstance(obj, dict):
        raise FerDistError(f"{path}: field 'manifest' is not a JSON object")
    if "format" not in obj:
        raise FerDistError(f"{path}: field 'format' is missing")
    if obj["format"] != FORMAT:
        raise FerDistError(f"{path}: format {obj['format']!r} is not {FORMAT!r} (made by another version of "
                           "fer-dist?)")
    if isinstance(obj.get("splits"), dict):
        # JSON keeps splits alphabetically (sorted keys); ids run train, val, test, then the others.
        obj["splits"] = {name: obj["splits"][name] for name in split_order(obj["splits"])}
    try:
        manifest = _MANIFEST.validate_python(obj)
    except ValidationError as err:
        raise _field_error(path, err) from None
    for name, split in manifest.splits.items():
        for i, shard in enumerate(split.shards):
            _check_shard(path, f"splits.{name}.shards[{i}]", shard)
    held = sum(info.count for _, info in manifest.shards())
    if manifest.num_ids != held:
        # every reader sizes its tables by num_ids: a wrong one must stop here, not as a huge allocation
        raise FerDistError(f"{path}: field 'num_ids' {manifest.num_ids}, but the shards hold {held} samples")
    return manifest


def _check_shard(path: Path, where: str, shard: ShardInfo) -> None:
    """What types alone do not say: a plain tar name, ids and counts, a digest per sample."""
    if Path(shard.file).name != shard.file or not shard.file.endswith(".tar") or shard.file[0] == ".":
        # Readers open <folder>/<file>: a path here could point them anywhere.
        raise FerDistError(f"{path}: field '{where}.file' {shard.file!r} is not a tar file name inside the "
                           "shard folder")
    if shard.count < 0 or shard.first_id < 0 or not 0 <= shard.labelled <= shard.count:
        raise FerDistError(f"{path}: field '{where}' count {shard.count}, first_id {shard.first_id}, "
                           f"labelled {shard.labelled} are not ids and counts")
    if len(shard.sample_digests) != shard.count * DIGEST_CHARS:
        raise FerDistError(f"{path}: field '{where}.sample_digests' holds {len(shard.sample_digests)} hex "
                           f"digits, not {DIGEST_CHARS} for each of its {shard.count} samples")
