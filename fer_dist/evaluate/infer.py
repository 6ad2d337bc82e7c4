"""Predictions of one model over shard splits, on one process or many: every sample counted once.

Each process predicts its share of an exhaustive pass (the trainer's own `Loaders.exhaustive`), then
(id, probabilities) are gathered from every process and duplicates dropped (`dist.gather_predictions`), so
every process ends with the same sorted table whatever the number of processes.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fer_dist import dist
from fer_dist.config import ShardsRef
from fer_dist.data.augment import eval_transform, normalise
from fer_dist.data.manifest import Manifest
from fer_dist.data.runset import ShardSet, fold_mask
from fer_dist.data.shardread import read_samples
from fer_dist.data.stream import Loaders
from fer_dist.errors import FerDistError
from fer_dist.models import FerNet

TTA_MODES = ("none", "flip", "tencrop")
TENCROP_SHARE = 0.875  # crop side as a share of the face: 42 of 48 px, the usual FER ten-crop margin


@dataclass(frozen=True)
class ShardSplits:
    """`DIR[:split[,split...]][@fold[,fold...]]` of the command line: some splits (and folds) of one shard
    directory."""

    dir: Path
    splits: tuple[str, ...]
    folds: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        """A row label: the folder's name, its splits and folds (`ckplus48:test`, `ck:train@3`)."""
        folds = f"@{','.join(map(str, self.folds))}" if self.folds is not None else ""
        return f"{self.dir.name}:{'+'.join(self.splits)}{folds}"

    def ref(self) -> ShardsRef:
        """The same selection as a config entry."""
        return ShardsRef(dir=str(self.dir), splits=list(self.splits),
                         folds=list(self.folds) if self.folds is not None else None)


def parse_shards(text: str, default_split: str = "test") -> ShardSplits:
    """`DIR` (its `default_split`), `DIR:split,split`, either with `@fold,fold` after it."""
    text, at, folds_text = text.partition("@")
    try:
        folds = tuple(int(f) for f in folds_text.split(",")) if at else None
    except ValueError:
        raise FerDistError(f"--shards ...@{folds_text}: fold ids are whole numbers (DIR:split@0,1)") from None
    directory, sep, splits = text.rpartition(":") if ":" in text else (text, "", "")
    if sep and not splits:
        raise FerDistError(f"--shards {text!r}: no split after ':' (DIR or DIR:split[,split])")
    names = tuple(s for s in splits.split(",") if s) if sep else (default_split,)
    return ShardSplits(Path(directory), names, folds)


@dataclass
class Predictions:
    """Gathered predictions over a set, sorted by id; the same on every process."""

    ids: np.ndarray        # [N] shard ids
    labels: np.ndarray     # [N] class, -1 unlabelled
    probs: np.ndarray      # [N, K]
    manifest: Manifest
    adapted: str           # how the shards' faces were fitted to the model's input, in words


def adaptation(manifest: Manifest, net: FerNet) -> str:
    """What the eval transform does to these shards' faces for this model, in words."""
    have, want = manifest.image, net.input_spec
    parts = []
    if have.size != want.size:
        parts.append(f"resized {have.size} -> {want.size} px")
    if have.channels != want.channels:
        parts.append("grey repeated to RGB" if want.channels == 3 else "RGB converted to grey")
    shape = f"{have.size} px {'grey' if have.channels == 1 else 'RGB'}"
    return f"{shape} faces " + (", ".join(parts) if parts else "as stored")


def _tencrop(images: torch.Tensor) -> list[torch.Tensor]:
    """Four corners and the centre, each also flipped, resized back to the model's side."""
    side = images.shape[-1]
    c = max(1, round(side * TENCROP_SHARE))
    starts = [(0, 0), (0, side - c), (side - c, 0), (side - c, side - c), ((side - c) // 2, (side - c) // 2)]
    crops = [images[..., y:y + c, x:x + c] for y, x in starts]
    crops = [F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False) for crop in crops]
    return crops + [crop.flip(-1) for crop in crops]


@torch.no_grad()
def batch_probs(net: FerNet, images: torch.Tensor, tta: str) -> torch.Tensor:
    """Softmax probabilities of a uint8 batch [B, C, S, S]; TTA averages the views' probabilities."""
    if tta not in TTA_MODES:
        raise FerDistError(f"--tta: {tta!r} is not one of {', '.join(TTA_MODES)}")
    x = normalise(images, net.input_spec)
    views = [x] if tta == "none" else [x, x.flip(-1)] if tta == "flip" else _tencrop(x)
    return torch.stack([torch.softmax(net(v).float(), dim=1) for v in views]).mean(0)


def tta_words(tta: str) -> str:
    """The test-time augmentation as it is stated beside every result."""
    share = f"{TENCROP_SHARE:.3g}"
    return {"none": "no test-time augmentation", "flip": "TTA: mean of the face and its mirror image",
            "tencrop": f"TTA: ten-crop (corners and centre at {share} of the side, and mirrors)"}[tta]


def predict_shards(net: FerNet, acc, target: ShardSplits, *, tta: str = "none", batch_size: int = 256,
                   num_workers: int = 0) -> Predictions:
    """Every sample of `target`'s splits predicted once across the processes of `acc`, gathered."""
    shardset = ShardSet([(target.dir, target.splits)])
    shards = shardset.shards(0)
    manifest = shardset.manifests[shardset.entries[0][0]]
    labels = dist.label_pass(acc, shardset).labels  # the ranks split the pass
    net = net.to(acc.device).eval()
    include = None if target.folds is None else fold_mask(shardset.num_ids, shards, target.ref())
    ids_parts = [torch.zeros(0, dtype=torch.long)]
    prob_parts = [torch.zeros(0, net.spec.num_classes)]
    autocast = acc.autocast() if acc.device.type != "cpu" else nullcontext()
    loaders = Loaders(shards, num_workers=num_workers, exhaustive=eval_transform(net.input_spec))
    with loaders, autocast:  # one pass: its workers end with the block, also when the model fails mid-pass
        for images, _labels, ids in loaders.exhaustive(shards, include, batch_size=batch_size,
                                                       rank=acc.process_index, world=acc.num_processes):
            prob_parts.append(batch_probs(net, images.to(acc.device), tta).cpu())
            ids_parts.append(ids)
    ids, probs = dist.gather_predictions(acc, torch.cat(ids_parts), torch.cat(prob_parts))
    expected = sum(s.count for s in shards) if include is None else int(include.sum())
    if ids.numel() != expected:
        raise RuntimeError(f"{target.name}: gathered {ids.numel()} predictions for {expected} samples")
    return Predictions(ids.numpy(), labels[ids].numpy(), probs.double().numpy(), manifest,
                       adaptation(manifest, net))


def read_metadata(target: ShardSplits, ids: np.ndarray) -> list[dict]:
    """Each id's `.json` member (the source's metadata: sequence, frame, intensity ...), in `ids`' order."""
    shardset = ShardSet([(target.dir, target.splits)])
    found: dict[int, dict] = {}
    for shard in shardset.shards(0):
        keys = np.arange(shard.first_run_id, shard.first_run_id + shard.count, dtype=np.int64)
        for sid, members in read_samples(shard.index(), keys, ("json",)):
            try:
                found[sid] = json.loads(members.get("json", b"{}"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise FerDistError(f"{shard.path}: sample {sid:08d} has no valid .json member") from None
    return [found[int(i)] for i in ids]
