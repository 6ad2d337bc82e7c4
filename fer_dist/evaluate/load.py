"""MODEL arguments: a run directory, an exported model or a checkpoint, loaded the same way for every command.

- a run directory (`runs/<name>`): its best model, `best/`;
- an export (`model.json` + `model.safetensors`, e.g. `runs/<name>/best`);
- a checkpoint (`runs/<name>/checkpoints/<tag>`): the model of that moment, rebuilt from the config saved
  in it (read with `torch.load(weights_only=True)`, like every checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fer_dist import checkpoint_files as checkpoint
from fer_dist.classes import CLASSES, NUM_CLASSES
from fer_dist.config import model_spec_fields
from fer_dist.data.manifest import read_manifest
from fer_dist.errors import FerDistError
from fer_dist.models import (
    FerNet,
    ModelSpec,
    apply_trainable,
    load_exported,
    preprocessing_of,
    read_export_meta,
)
from fer_dist.models.export import META_FILE
from fer_dist.models.net import assemble_model
from fer_dist.models.weights import load_checked


@dataclass
class LoadedModel:
    """A model ready for inference (CPU, eval mode) and what is known of how it was made."""

    net: FerNet
    path: Path                      # the export or checkpoint directory actually read
    kind: str                       # "export" | "checkpoint"
    preprocessing: dict[str, Any] | None   # preprocessing_of() of its training shards, where known
    run_dir: Path | None            # the run it belongs to, where it is inside one

    @property
    def name(self) -> str:
        """A short label for tables: the run's name, with the checkpoint tag where it is one."""
        if self.run_dir is None:
            return self.path.name
        return self.run_dir.name if self.kind == "export" else f"{self.run_dir.name}@{self.path.name}"

    def default_out(self, command: str) -> Path:
        """A command's default output: in the run (`eval/`, `eval-<tag>/`), else beside the model."""
        if self.run_dir is None:
            return self.path.parent / f"{self.path.name}-{command}"
        return self.run_dir / (command if self.kind == "export" else f"{command}-{self.path.name}")


def _run_of(path: Path) -> Path | None:
    """The run directory holding `path` (`<run>/best` or `<run>/checkpoints/<tag>`), if any."""
    for parent in (path.parent, path.parent.parent):
        if (parent / "config.yaml").is_file() and (parent / checkpoint.CHECKPOINTS).is_dir():
            return parent
    return None


def _training_preprocessing(config: dict[str, Any]) -> dict[str, Any] | None:
    """The labelled shards' preprocessing from a saved config, where those shards can still be read."""
    try:
        return preprocessing_of(read_manifest(Path(config["data"]["labelled"][0]["dir"])))
    except (FerDistError, KeyError, IndexError, TypeError):
        return None


def _from_checkpoint(path: Path) -> LoadedModel:
    saved, _ = checkpoint.load_checkpoint(path, None)
    config = saved.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "model" not in saved:
        raise FerDistError(f"{path}: not a fer-dist training checkpoint (no model or config in it)")
    spec = ModelSpec.from_dict({"num_classes": NUM_CLASSES, **model_spec_fields(config["model"])},
                               source=str(path / "state.pt"))
    net, _ = assemble_model(spec, load_weights=False)  # its weights are about to be replaced
    load_checked(net, saved["model"], path / checkpoint.STATE)
    apply_trainable(net, spec.trainable)
    net.classes = CLASSES
    return LoadedModel(net.eval(), path, "checkpoint", _training_preprocessing(config), _run_of(path))


def load_model(path: str | Path) -> LoadedModel:
    """The model `path` names (see the module's docstring); a one-line error for anything else."""
    path = Path(path)
    if not path.exists():
        raise FerDistError(f"{path}: no such model (a run directory, an export or a checkpoint)")
    if (path / checkpoint.CHECKPOINTS).is_dir() and not (path / META_FILE).is_file():
        if not (path / "best" / META_FILE).is_file():
            raise FerDistError(f"{path}: the run has no best/ model yet; name one of its checkpoints "
                               f"({path / checkpoint.CHECKPOINTS}/<tag>)")
        path = path / "best"
    if (path / META_FILE).is_file():
        meta = read_export_meta(path)
        net = load_exported(path)
        return LoadedModel(net, path, "export", meta.get("preprocessing"), _run_of(path))
    if (path / checkpoint.STATE).is_file():
        return _from_checkpoint(path)
    raise FerDistError(f"{path}: neither a run directory, an export (model.json) nor a checkpoint (state.pt)")
