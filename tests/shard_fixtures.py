"""Shard directories in the contract format (docs/ARCHITECTURE.md), written with tarfile for stream tests.

Independent of fer_dist/data/shards.py on purpose: the streams are tested against the contract, not against
the writer. Pixel values encode the id (`pixel_value`) so a test can check that an image travelled with its
id through shuffles and workers; labels follow `fixture_label`.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

CLASSES = ("anger", "disgust", "fear", "happy", "neutral", "sadness", "surprise")


@dataclass
class Sample:
    """One sample to write: label (-1 unlabelled), PNG bytes, and extra members (ext -> bytes) if any."""

    label: int
    png: bytes
    extra: dict[str, bytes] = field(default_factory=dict)


def pixel_value(sample_id: int) -> int:
    """The grey level of a synthetic sample's pixels (red channel for RGB): a function of its id."""
    return (sample_id * 37 + 11) % 251


def fixture_label(sample_id: int) -> int:
    """The label of a synthetic sample: every fourth one is unlabelled."""
    return -1 if sample_id % 4 == 3 else sample_id % 7


def fixture_include(num_ids: int) -> torch.Tensor:
    """A selection that leaves some ids out (ids divisible by 5), for include-mask tests."""
    return torch.arange(num_ids) % 5 != 0


def fixture_targets(num_ids: int, k: int = 7) -> torch.Tensor:
    """A target table whose row i is recognisably i's: [num_ids, k] float."""
    ids = torch.arange(num_ids, dtype=torch.float32)[:, None]
    return ids * 10 + torch.arange(k, dtype=torch.float32)


def synthetic_png(sample_id: int, size: int, channels: int) -> bytes:
    """A flat PNG whose pixels encode the id: grey `v`, or RGB (v, v // 2, 255 - v)."""
    v = pixel_value(sample_id)
    if channels == 1:
        image = np.full((size, size), v, dtype=np.uint8)
    else:
        rgb = np.empty((size, size, 3), dtype=np.uint8)
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = v, v // 2, 255 - v
        image = rgb[..., ::-1]  # cv2 writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    assert ok
    return buf.tobytes()


class _Touch:
    """Unpickling this object creates the marker file: the payload of the malicious `.pyd` member."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_payload(marker: Path) -> bytes:
    """Pickle bytes that create `marker` if anyone unpickles them."""
    return pickle.dumps(_Touch(marker))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Add a member; returns the CRC-32 of its tar bytes (header, data, padding)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
    start = tar.fileobj.tell()
    tar.addfile(info, io.BytesIO(data))
    tar.fileobj.flush()
    return start


def _write_tar(path: Path, first_id: int, samples: list[Sample]) -> tuple[str, str]:
    """The shard's sha256 and its samples' CRC-32 digests (over the .cls, .json, .png members' tar bytes)."""
    buf = io.BytesIO()
    spans = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, s in enumerate(samples):
            key = f"{first_id + i:08d}"
            meta = {"id": first_id + i, "label": s.label}
            start = _add(tar, f"{key}.cls", str(s.label).encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            _add(tar, f"{key}.png", s.png)
            spans.append((start, buf.tell()))
            for ext, data in s.extra.items():
                _add(tar, f"{key}.{ext}", data)
    data = buf.getvalue()
    digests = "".join(f"{zlib.crc32(data[a:b]):08x}" for a, b in spans)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), digests


def write_dir(out: Path, splits: dict[str, list[list[Sample]]], *, size: int, channels: int) -> dict:
    """Write `<out>/<split>-NNNNNN.tar` (one list of samples per shard, ids in order) and manifest.json."""
    out.mkdir(parents=True, exist_ok=True)
    next_id, manifest_splits = 0, {}
    for split, shards in splits.items():
        entries, counts = [], dict.fromkeys([*CLASSES, "unlabelled"], 0)
        for index, samples in enumerate(shards):
            file = f"{split}-{index:06d}.tar"
            digest, sample_digests = _write_tar(out / file, next_id, samples)
            labelled = sum(s.label >= 0 for s in samples)
            entries.append({"file": file, "count": len(samples), "first_id": next_id, "labelled": labelled,
                            "sha256": digest, "sample_digests": sample_digests})
            for s in samples:
                counts[CLASSES[s.label] if s.label >= 0 else "unlabelled"] += 1
            next_id += len(samples)
        total = sum(e["count"] for e in entries)
        labelled = sum(e["labelled"] for e in entries)
        manifest_splits[split] = {"count": total, "labelled": labelled, "unlabelled": total - labelled,
                                  "class_counts": counts, "shards": entries}
    manifest = {"format": "fer-dist-shards/1", "dataset": "fixture", "classes": list(CLASSES),
                "num_ids": next_id, "image": {"size": size, "channels": channels}, "splits": manifest_splits,
                "folds": None, "params": {},
                "source": {"fingerprint": f"sha256:fixture-{out.name}", "files": 0},
                "faces": {}, "skipped": [], "created_by": "tests/shard_fixtures.py"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def synthetic_dir(
    out: Path,
    shard_sizes: dict[str, list[int]],
    *,
    size: int = 8,
    channels: int = 1,
    label: Callable[[int], int] = fixture_label,
    extra: dict[int, dict[str, bytes]] | None = None,
) -> dict:
    """A shard directory of flat synthetic faces; `extra` adds members to chosen ids (id -> {ext: bytes})."""
    next_id, splits = 0, {}
    for split, sizes in shard_sizes.items():
        splits[split] = []
        for n in sizes:
            ids = range(next_id, next_id + n)
            splits[split].append([Sample(label(i), synthetic_png(i, size, channels), (extra or {}).get(i, {}))
                                  for i in ids])
            next_id += n
    return write_dir(out, splits, size=size, channels=channels)


def damage_pngs(folder: Path, count: int) -> list[str]:
    """Flip a byte in the PNG of the first `count` samples of `folder`'s first train shard; their keys."""
    path = folder / "train-000000.tar"
    data = bytearray(path.read_bytes())
    keys = []
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".png") and len(keys) < count:
                data[member.offset_data + member.size // 2] ^= 0x10
                keys.append(member.name.split(".")[0])
    path.write_bytes(bytes(data))
    return keys
