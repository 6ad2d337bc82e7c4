"""The tiny training that the trainer, launch, SLURM and evaluation tests share (`from train_fixtures import
...`): synthetic shards of 12 subjects x 6 sequences x 5 frames, small_cnn, 2 warm-up epochs, 3 rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fer_dist.data.pack import pack
from fer_dist.data.sources.base import SourceOptions


def tiny_training(root: Path, **sections: dict[str, Any]) -> Path:
    """`root`/shards and `root`/config.yaml over them (runs under `root`/runs); `sections` update the
    config's sections (`run={"debug": True}`). Returns `root`."""
    pack("synthetic", [], root / "shards", options=SourceOptions(subjects=12, frames=5), workers=1,
         progress=False)
    ref = lambda split: [{"dir": str(root / "shards"), "splits": [split]}]  # noqa: E731
    config: dict[str, dict[str, Any]] = {
        "data": {"labelled": ref("train"), "unlabelled": ref("train"), "val": ref("val"), "test": ref("test"),
                 "num_workers": 1},
        "model": {"backbone": "small_cnn", "pretrained": False, "trainable": "all"},
        "method": {"warmup_epochs": 2, "warmup_patience": 5, "max_rounds": 3, "tau": 0.3},
        "optim": {"lr": 0.002, "batch_size": 16},
        "run": {"dir": str(root / "runs"), "progress": False},
    }
    for name, values in sections.items():
        config[name].update(values)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root
