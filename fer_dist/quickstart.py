"""The quick start (`fer-dist train` with no --config): its config, shipped in the package, and the
synthetic shards it trains on, made on first use."""

from __future__ import annotations

import sys
from pathlib import Path

from fer_dist.files import is_main_launch_process, wait_for_file
from fer_dist.resources import resource_path

QUICKSTART = resource_path("quickstart_synthetic.yaml")


def ensure_synthetic_shards(out: Path) -> None:
    """The quick start (no --config, no data override) shards the synthetic set first where it is missing."""
    if (out / "manifest.json").exists():
        return
    if is_main_launch_process():
        print(f"{out} is missing: sharding the built-in synthetic data set first", file=sys.stderr)
        from fer_dist.data.pack import pack

        pack("synthetic", [], out)
    wait_for_file(out / "manifest.json")
