"""The data of one training run: which ids are X_l, X_u, validation and test, over one id space.

A run may combine several shard directories (FER2013 labelled, CK+ unlabelled ...). `ShardSet` gives each
directory an id offset; the offsets are saved in checkpoints and checked on resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from fer_dist.config import DataConfig, ShardsRef
from fer_dist.data.integrity import checked_labels
from fer_dist.data.shardread import read_samples
from fer_dist.data.shardset import RunShard, ShardSet
from fer_dist.errors import FerDistError
from fer_dist.hashing import GOLDEN, mix64


@dataclass
class RunData:
    """Masks over the run's ids ([num_ids] bool) and the shards each part is read from."""

    shardset: ShardSet
    labels: torch.Tensor        # [num_ids] long: the class, -1 where unlabelled (or not in any split used)
    labelled: torch.Tensor      # X_l
    unlabelled: torch.Tensor    # X_u: labels hidden from the method
    val: torch.Tensor
    test: torch.Tensor
    train_shards: list[RunShard]
    val_shards: list[RunShard]
    test_shards: list[RunShard]
    skipped: list[str] = field(default_factory=list)  # damaged samples left out (data.on_error=skip)

    @property
    def num_ids(self) -> int:
        return int(self.labels.numel())

    def method_labels(self) -> torch.Tensor:
        """Labels as the method sees them: X_l's classes, -1 for everything else."""
        return torch.where(self.labelled, self.labels, torch.full_like(self.labels, -1))


def _entries(cfg: DataConfig) -> list[tuple[str, ShardsRef]]:
    # X_u last: directories get their id offsets in this order, so the ids of X_l, val and test do not
    # depend on which unlabelled set an arm adds (arms share what they do not vary).
    return [(part, ref) for part in ("labelled", "val", "test", "unlabelled") for ref in getattr(cfg, part)]


def _mask(num_ids: int, shards: list[RunShard]) -> torch.Tensor:
    mask = torch.zeros(num_ids, dtype=torch.bool)
    for s in shards:
        mask[s.first_run_id: s.first_run_id + s.count] = True
    return mask


def fold_mask(num_ids: int, shards: list[RunShard], ref: ShardsRef,
              damaged: torch.Tensor | None = None) -> torch.Tensor:
    """The ids of `shards` whose fold (their `.json` metadata, from `shard --folds K`) is in `ref.folds`;
    never a `damaged` id (left out under data.on_error=skip, its metadata not to be trusted)."""
    keep, wanted = torch.zeros(num_ids, dtype=torch.bool), set(ref.folds or ())
    for shard in shards:
        ids = torch.arange(shard.first_run_id, shard.first_run_id + shard.count)
        if damaged is not None:
            ids = ids[~damaged[ids]]
        if not ids.numel():
            continue  # a shard that could not be indexed at all
        keys = ids.numpy() - shard.offset
        for sid, members in read_samples(shard.index(), keys, ("json",)):
            try:
                fold = json.loads(members.get("json", b"{}")).get("fold")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                raise FerDistError(f"{shard.path}: sample {sid:08d} has no valid .json member") from None
            if not isinstance(fold, int):
                raise FerDistError(f"{ref.dir}: data folds {ref.folds}: its samples carry no fold id "
                                   "(shard it with --folds K)")
            keep[shard.offset + sid] = fold in wanted
    return keep


def share_mask(mask: torch.Tensor, labels: torch.Tensor, local_ids: torch.Tensor, share: float,
               seed: int) -> torch.Tensor:
    """The `share` of `mask`'s ids kept, class by class (-1 a class of its own): per class the
    floor(share * n + 0.5) ids of smallest hash of (seed, id within its shard folder). Ranking by a keyed
    hash makes shares nested (0.1 inside 0.4) and independent of the other folders a config names."""
    key = int.from_bytes(hashlib.sha256(f"fer-dist/share/{seed}".encode()).digest()[:8], "big")
    rank = mix64(local_ids.numpy().astype(np.uint64) * GOLDEN ^ np.uint64(key))
    keep = torch.zeros_like(mask)
    for cls in torch.unique(labels[mask]).tolist():
        ids = torch.nonzero(mask & (labels == cls)).flatten()
        n = int(share * ids.numel() + 0.5)
        order = np.lexsort((ids.numpy(), rank[ids.numpy()]))  # by hash, then by id
        keep[ids[torch.from_numpy(order[:n])]] = True
    return keep


def _local_ids(num_ids: int, shardset: ShardSet) -> torch.Tensor:
    """Each run id's id within its shard folder (run id - the folder's offset)."""
    local = torch.arange(num_ids)
    for entry in shardset.offsets:
        local[entry["offset"]: entry["offset"] + entry["num_ids"]] -= entry["offset"]
    return local


def _unique(shards: list[RunShard]) -> list[RunShard]:
    seen, out = set(), []
    for s in shards:
        if s.path not in seen:
            seen.add(s.path)
            out.append(s)
    return out


def load_run_data(cfg: DataConfig, seed: int = 0) -> RunData:
    """Open every shard directory the config names and build the masks (reads only `.cls` members);
    `seed` draws the `share` subsets where data.subset_seed is None."""
    entries = _entries(cfg)
    shardset = ShardSet([(ref.dir, ref.splits) for _, ref in entries])
    parts: dict[str, list[RunShard]] = {"labelled": [], "unlabelled": [], "val": [], "test": []}
    for i, (part, _) in enumerate(entries):
        parts[part] += shardset.shards(i)
    checked = checked_labels(shardset, cfg.on_error)  # every sample's digest checked
    labels = checked.labels
    n = shardset.num_ids
    has_label = labels >= 0
    named = {part: torch.zeros(n, dtype=torch.bool) for part in parts}
    for i, (part, ref) in enumerate(entries):
        mask = _mask(n, shardset.shards(i))
        if ref.folds is not None:
            mask &= fold_mask(n, shardset.shards(i), ref, checked.damaged)
        if ref.share is not None:
            subset_seed = seed if cfg.subset_seed is None else cfg.subset_seed
            mask = share_mask(mask & ~checked.damaged, labels, _local_ids(n, shardset), ref.share,
                              subset_seed)
        named[part] |= mask
    labelled = named["labelled"] & has_label
    unlabelled = named["unlabelled"] & ~labelled & ~checked.damaged
    val = named["val"] & has_label
    test = named["test"] & has_label
    if not labelled.any():
        raise FerDistError("data.labelled: the splits named hold no labelled sample")
    if not val.any():
        raise FerDistError("data.val: the splits named hold no labelled sample")
    # X_u may overlap the test split (the paper's transductive protocol: labels stay hidden); X_l may not.
    leak = labelled & (val | test)
    if leak.any():
        raise FerDistError(f"data: {int(leak.sum())} labelled training samples are also val/test samples; "
                           "check data.labelled against data.val and data.test")
    return RunData(
        shardset=shardset, labels=labels, labelled=labelled, unlabelled=unlabelled, val=val, test=test,
        train_shards=_unique(parts["labelled"] + parts["unlabelled"]),
        val_shards=_unique(parts["val"]), test_shards=_unique(parts["test"]), skipped=checked.problems,
    )
