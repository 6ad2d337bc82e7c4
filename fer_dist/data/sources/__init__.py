"""The sources registry: each name maps to the module (imported on first use) that lists that data set."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fer_dist.data.sources.base import ImageReadError, Listing, Record, SourceOptions
from fer_dist.errors import FerDistError

__all__ = ["SOURCES", "ImageReadError", "Listing", "Record", "SourceOptions", "SourceSpec", "get_source"]


@dataclass(frozen=True)
class SourceSpec:
    """A registered source: where its lister lives and what `fer-dist shard` needs to know about it."""

    name: str
    module: str
    help: str
    default_align: str  # "none" | "haar"
    official_splits: bool  # records carry meta["split"] from the data set itself
    needs_src: bool
    function: str = "list_records"


_PKG = "fer_dist.data.sources"
SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in (
        SourceSpec("fer2013", f"{_PKG}.fer2013",
                   "FER2013: the Kaggle CSV or train|test/<class>/<Usage>_<id>.jpg", "none", True, True),
        SourceSpec("ckplus", f"{_PKG}.ckplus", "CK+: cohn-kanade-images/ + Emotion/, or CK+48 class folders",
                   "haar", False, True),
        SourceSpec("rafd", f"{_PKG}.rafd", "RaFD: Rafd090_01_Caucasian_female_angry_frontal.jpg names",
                   "haar", False, True),
        SourceSpec("jaffe", f"{_PKG}.jaffe", "JAFFE: KA.AN1.39.tiff names", "haar", False, True),
        SourceSpec("imagefolder", f"{_PKG}.folders", "<root>/<class>/* with class names mapped (--class-map)",
                   "haar", False, True),
        SourceSpec("unlabelled", f"{_PKG}.folders", "any folder tree of images, all unlabelled",
                   "haar", False, True, function="list_unlabelled"),
        SourceSpec("synthetic", f"{_PKG}.synthetic",
                   "built-in procedural faces with a true intensity per frame", "none", False, False),
    )
}


def source_spec(name: str) -> SourceSpec:
    """The registered source `name`; `--dataset` names it in the error, with the known ones."""
    spec = SOURCES.get(name)
    if spec is None:
        raise FerDistError(f"--dataset: unknown data set {name!r} (known: {', '.join(SOURCES)})")
    return spec


def get_source(name: str) -> Callable[[list[Path], SourceOptions], Listing]:
    """The `list_records(src, options)` function of a registered source, imported on first use."""
    spec = SOURCES.get(name)
    if spec is None:
        raise FerDistError(f"unknown source {name!r} (known: {', '.join(SOURCES)})")
    return getattr(importlib.import_module(spec.module), spec.function)
