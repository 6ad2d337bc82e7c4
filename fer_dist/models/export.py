"""Exported models: `model.safetensors` (the state dict) and `model.json` (how to rebuild it); no pickle."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch

from fer_dist import __version__
from fer_dist.data.manifest import Manifest
from fer_dist.errors import FerDistError
from fer_dist.files import staged_dir, write_errors
from fer_dist.models.net import FerNet, apply_trainable, assemble_model
from fer_dist.models.spec import ModelSpec
from fer_dist.models.weights import load_checked, read_state_file

FORMAT = "fer-dist-model/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


def export_model(model: FerNet, out_dir: str | Path, classes: Sequence[str] | None = None,
                 preprocessing: dict[str, Any] | None = None) -> Path:
    """Write `out_dir`/model.safetensors and model.json atomically (a temp dir renamed into place).

    `classes` defaults to the model's own class names. `preprocessing` records how the training faces were
    made (`shard`'s alignment, side and channels: `preprocessing_of`), so `fer-dist predict` can make new
    faces the same way. An existing export at `out_dir` is replaced.
    """
    if not isinstance(model, FerNet):
        raise TypeError(f"export_model needs a FerNet (unwrap DDP/compile first), got {type(model).__name__}")
    out = Path(out_dir)
    names = list(classes if classes is not None else model.classes or ())
    if len(names) != model.spec.num_classes:
        raise FerDistError(f"{out}: the model has {model.spec.num_classes} classes and {len(names)} class "
                           "names (pass classes=...)")
    # safetensors refuses views of shared or non-contiguous storage; an export owns plain CPU copies.
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / META_FILE).is_file()):
        raise FerDistError(f"{out}: exists and is not a fer-dist model export; not overwriting it")
    with write_errors(f"{out}: cannot write the export (the previous one is intact)"), staged_dir(out) as tmp:
        # serialised here and written by Python: a full disk is then an OSError (write_errors), where
        # save_file's own writer raises its SafetensorError
        (tmp / WEIGHTS_FILE).write_bytes(safetensors.torch.save(tensors, metadata={"format": "pt"}))
        meta = {
            "format": FORMAT,
            "created_by": f"fer-dist {__version__}",
            "model": model.spec.to_dict(),
            "trainable": model.trainable,
            "input_spec": dataclasses.asdict(model.input_spec),
            "classes": names,
            "preprocessing": preprocessing,
            "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(tmp / WEIGHTS_FILE)},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def preprocessing_of(manifest: Manifest) -> dict[str, Any]:
    """How a shard folder's faces were made: what `predict` must repeat on a new image."""
    return {"dataset": manifest.dataset, "align": manifest.params.get("align", "none"),
            "size": manifest.image.size, "channels": manifest.image.channels}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_export_meta(model_dir: str | Path) -> dict[str, Any]:
    """The checked contents of `model_dir`/model.json."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise FerDistError(f"{path}: not found (not a fer-dist model export)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FerDistError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise FerDistError(f"{path}: format {found!r} is not {FORMAT!r}")
    for key, kind in (("model", dict), ("trainable", str), ("classes", list), ("weights", dict)):
        if not isinstance(meta.get(key), kind):
            raise FerDistError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    return meta


def load_exported(model_dir: str | Path) -> FerNet:
    """Rebuild an exported model on the CPU in eval mode from its two files alone (no network, no pickle)."""
    meta_path = Path(model_dir) / META_FILE
    meta = read_export_meta(model_dir)
    spec = ModelSpec.from_dict(meta["model"], source=str(meta_path))
    if len(meta["classes"]) != spec.num_classes:
        raise FerDistError(f"{meta_path}: {len(meta['classes'])} classes for num_classes {spec.num_classes}")
    weights_path = Path(model_dir) / WEIGHTS_FILE
    expected = meta["weights"].get("sha256")
    if weights_path.is_file() and expected and _sha256(weights_path) != expected:
        raise FerDistError(f"{weights_path}: sha256 differs from the one in {META_FILE} (file changed?)")
    state = read_state_file(weights_path)
    # Rebuilt without its original weights: they are about to be overwritten by the export's.
    model, _ = assemble_model(spec, load_weights=False)
    load_checked(model, state, weights_path)
    try:
        apply_trainable(model, meta["trainable"])
    except FerDistError as exc:
        raise FerDistError(f"{meta_path}: {exc}") from None
    model.classes = tuple(meta["classes"])
    return model.eval()
