"""Files the package ships (package data): the quick start's config and the SLURM batch script templates.

Each is a symlink in the repository to the copy users know (`launch_configs/train/quickstart_synthetic.yaml`,
`tools/slurm/*.sbatch`), the one source of truth; a wheel holds the files themselves, so an installed
`fer-dist` needs no checkout.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fer_dist.errors import FerDistError


def resource_path(name: str) -> Path:
    """The path of a shipped file, e.g. "slurm/single_node.sbatch"."""
    found = files(__name__).joinpath(*name.split("/"))
    # an installed package is a folder; a zipped one has no paths to hand to readers and sbatch
    if not isinstance(found, Path):
        raise FerDistError(f"fer_dist/resources/{name}: not a file on disk (install fer-dist unzipped)")
    return found
