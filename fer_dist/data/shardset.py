"""A run's id space over shard directories: each directory's id offset, its shards, every sample's label.

Each shard holds a known contiguous id range (its manifest entry), so what a selection mask takes from each
shard is known before anything is read (fer_dist/data/plan.py plans on it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fer_dist.data.integrity import checked_labels
from fer_dist.data.manifest import Manifest, ShardInfo, read_manifest
from fer_dist.data.shardread import ShardIndex, index_shard
from fer_dist.errors import FerDistError


@dataclass(frozen=True)
class RunShard:
    """One shard as a run sees it: its samples hold run ids first_run_id .. first_run_id + count - 1."""

    path: Path
    count: int
    first_run_id: int
    offset: int = 0  # the directory's id offset: tar key = run id - offset

    def index(self) -> ShardIndex:
        """The shard's member index (walked and checked once per process and file version, then cached)."""
        return index_shard(str(self.path), self.first_run_id - self.offset, self.count)


def load_manifest(directory: Path) -> Manifest:
    """A shard directory's manifest, checked for the id ranges the streams rely on."""
    manifest = read_manifest(Path(directory))
    for split, info in manifest.splits.items():
        for shard in info.shards:
            if shard.first_id < 0 or shard.first_id + shard.count > manifest.num_ids:
                raise FerDistError(f"{directory}/manifest.json: split {split}: shard {shard.file} has ids "
                                   f"beyond num_ids {manifest.num_ids}")
    return manifest


class ShardSet:
    """Shard directories in one id space: directory k's ids are offset by the earlier ones' num_ids."""

    def __init__(self, entries: Sequence[tuple[str | Path, Sequence[str]]]) -> None:
        self.entries: list[tuple[Path, tuple[str, ...]]] = [(Path(d).resolve(), tuple(s)) for d, s in entries]
        self.manifests: dict[Path, Manifest] = {}
        self._offsets: dict[Path, int] = {}
        total = 0
        for directory, _ in self.entries:
            if directory not in self.manifests:
                self.manifests[directory] = load_manifest(directory)
                self._offsets[directory] = total
                total += self.manifests[directory].num_ids
        self.num_ids = total

    @property
    def offsets(self) -> list[dict]:
        """What fixes the id space, per directory in order: saved with a run and compared on resume."""
        return [{"dataset": m.dataset, "fingerprint": m.source.get("fingerprint"),
                 "num_ids": m.num_ids, "offset": self._offsets[d]} for d, m in self.manifests.items()]

    def infos(self, entry: int) -> Iterator[tuple[Path, ShardInfo, int]]:
        """(file, manifest entry, directory's id offset) of each shard of entry `entry`: its splits in the
        order named, each in id order."""
        directory, splits = self.entries[entry]
        manifest, offset = self.manifests[directory], self._offsets[directory]
        for split in splits:
            if split not in manifest.splits:
                raise FerDistError(f"{directory}: no split {split!r} (it has {', '.join(manifest.splits)})")
            for info in manifest.splits[split].shards:
                path = directory / info.file
                if not path.is_file():
                    raise FerDistError(f"{path}: shard listed in the manifest is missing")
                yield path, info, offset

    def shards(self, entry: int) -> list[RunShard]:
        """The shards of entry `entry` as the streams read them."""
        return [RunShard(path, s.count, offset + s.first_id, offset) for path, s, offset in self.infos(entry)]


def read_labels(shardset: ShardSet) -> torch.Tensor:
    """[num_ids] long: each sample's class from its `.cls` member, -1 if unlabelled or in no split named.

    Every sample is checked against its manifest digest on the way (integrity.py): a damaged one raises.
    """
    return checked_labels(shardset).labels
