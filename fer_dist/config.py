"""The typed training config: one declaration per field, the paper's values as defaults.

Precedence: defaults < YAML file < command-line `key=value` overrides. Unknown keys and bad values are
errors that name the key. YAML is read with `safe_load` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fer_dist.errors import FerDistError
from fer_dist.files import write_text_atomic


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ShardsRef(_Section):
    """Some splits of one shard directory (the output of `fer-dist shard`)."""

    dir: str = Field(description="shard directory, relative to the working directory or absolute")
    splits: list[str] = Field(min_length=1, description="split names inside it, e.g. [train]")
    folds: list[int] | None = Field(None, min_length=1, description="keep only these fold ids (shards made "
                                    "with --folds K; `fer-dist cv` sets them); None: every sample")
    share: float | None = Field(None, gt=0.0, le=1.0, description="keep this share of each class (label -1 "
                                "counts as a class), the ids of smallest hash of (data.subset_seed, id): "
                                "shares of one split are nested (X_l at 0.1 lies inside X_u's 0.4)")

    @field_validator("folds")
    @classmethod
    def _folds_are_ids(cls, folds: list[int] | None) -> list[int] | None:
        if folds is not None and min(folds) < 0:
            raise ValueError("fold ids are 0..K-1")
        return folds


class DataConfig(_Section):
    """Which shards are labelled, unlabelled, validation and test data (no defaults: a run names its data)."""

    labelled: list[ShardsRef] = Field(default_factory=list, description="X_l: the samples with a class")
    unlabelled: list[ShardsRef] = Field(default_factory=list,
                                        description="X_u: samples of these splits not in X_l, labels hidden")
    val: list[ShardsRef] = Field(default_factory=list, description="validation (labelled)")
    test: list[ShardsRef] = Field(default_factory=list, description="test (labelled); may be empty")
    subset_seed: int | None = Field(None, description="seed of the `share` draws; None: run.seed (each "
                                    "seed its own labelled subset)")
    num_workers: int = Field(1, ge=0, description="DataLoader workers per process")
    augment: bool = Field(True, description="augment training faces: random flip, rotation within "
                          "10 degrees, small shift and zoom (the paper's)")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="a damaged sample (its manifest digest, its label): raise stops the run naming "
        "it; skip leaves it out and counts it in the log")


class ModelConfig(_Section):
    """The network: backbone, head and what is trained."""

    backbone: str = Field("vggface", description="vggface, dlib_resnet (face-pretrained, fer-dist[face]), "
                          "small_cnn, resnet18/34/50, mobilenet_v2, ...")
    pretrained: bool = Field(True, description="start from the backbone's pretrained weights")
    weights: str | None = Field(None, description="local weights file (required for vggface when pretrained)")
    trainable: str = Field("last_block", description="all | head | last_block | last_n_blocks:N")
    input_size: int | None = Field(None, ge=16, description="input side in pixels; None: the backbone's")
    hidden: int = Field(128, ge=1, description="units of the FC layer of the head")
    dropout: float = Field(0.6, ge=0.0, lt=1.0, description="dropout of the head")
    sync_bn: bool = Field(False, description="batch norms as SyncBatchNorm over all processes (W > 1, GPUs): "
                          "for small per-GPU batches on backbones with batch norm")


# How the network is trained across processes, not what it is: left out of the model's spec and exports.
TRAINING_ONLY_MODEL_KEYS = frozenset({"sync_bn"})


def model_spec_fields(model: dict[str, Any]) -> dict[str, Any]:
    """A model config section (dict) without the keys that do not describe the network."""
    return {k: v for k, v in model.items() if k not in TRAINING_ONLY_MODEL_KEYS}


def pseudo_target_mode(text: str) -> tuple[str, float | None]:
    """`soft`, `hard` or `sharpen:T` (T > 0) -> (kind, T or None); ValueError otherwise."""
    kind, _, temp = text.partition(":")
    if kind in ("soft", "hard") and not temp:
        return kind, None
    if kind == "sharpen":
        try:
            t = float(temp)
        except ValueError:
            t = -1.0
        if t > 0:
            return kind, t
    raise ValueError("expected soft, hard or sharpen:T with a temperature T > 0")


class MethodConfig(_Section):
    """METHOD.md sections 1-4; the switches make each arm of the ablation a config."""

    label_smoothing: bool = Field(True, description="two-sided label smoothing of the labelled targets")
    eps: float = Field(0.1, gt=0.0, lt=1.0, description="smoothing epsilon of the label smoothing")
    warmup_epochs: int = Field(30, ge=0, description="most warm-up epochs")
    warmup_patience: int = Field(3, ge=1, description="end warm-up after N epochs without better val acc")
    self_training: bool = Field(True, description="run self-training rounds after the warm-up")
    use_unlabelled: bool = Field(True, description="swap confident unlabelled samples into each round")
    tau: float = Field(0.7, gt=0.0, lt=1.0, description="confidence threshold for unlabelled samples")
    threshold: Literal["fixed", "class_adaptive"] = Field(
        "fixed", description="fixed: tau (the paper); class_adaptive: per class, the mean confidence of the "
        "correctly predicted labelled samples of the pass (tau where none)")
    threshold_floor: float | None = Field(None, gt=0.0, lt=1.0, description="class_adaptive: no class "
                                          "threshold below this (Ada-CM floors its margin); None: no floor")
    pseudo_targets: str = Field("soft", description="target of a confident unlabelled sample: soft (its "
                                "prediction, the paper), hard (one-hot argmax) or sharpen:T (p^(1/T), "
                                "renormalised)")
    unlabelled_augment: Literal["none", "trivialaugment", "randaugment"] = Field(
        "none", description="strong augmentation (torchvision's) on top of ours for the unlabelled samples "
        "of a round; none: the same augmentation as labelled ones (the paper)")
    alpha_rule: bool = Field(True, description="rewrite labelled targets with the alpha rule")
    alpha: float = Field(0.7, gt=0.0, lt=1.0, description="alpha of the labelled-target rule")
    replace_fraction: float = Field(0.1, ge=0.0, le=1.0, description="r: share of X_l swapped for confident "
                                    "unlabelled samples each round")
    stop_window: int = Field(5, ge=1, description="T of the moving-average stopping rule")
    stop_rule: Literal["moving_average", "none"] = Field(
        "moving_average", description="moving_average: stop when it falls (the paper); none: run max_rounds "
        "(budget-matched arms), the round the rule would have stopped at still recorded")
    max_rounds: int = Field(50, ge=0, description="most self-training rounds")
    epochs_per_round: int = Field(1, ge=1, description="training epochs per round (the paper: one)")

    @field_validator("pseudo_targets")
    @classmethod
    def _pseudo_mode(cls, mode: str) -> str:
        pseudo_target_mode(mode)  # ValueError says what is wrong
        return mode


class OptimConfig(_Section):
    """Adam as in METHOD.md section 6."""

    lr: float = Field(1e-5, gt=0.0, description="learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam beta1, beta2")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay")
    batch_size: int = Field(32, ge=1, description="GLOBAL batch: each of W processes takes batch_size / W")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient norm to this; None: off")
    lr_warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps; 0: constant")
    max_nonfinite_steps: int = Field(10, ge=0, description="steps skipped for a NaN/inf loss or gradient "
                                     "before the run stops (fp16: the GradScaler's own skips not counted)")


class RunConfig(_Section):
    """Where the run lives, how it checkpoints, logs and resumes."""

    name: str = Field("run", min_length=1, description="run name: runs/<name>/")
    dir: str = Field("runs", description="parent directory of runs")
    seed: int = Field(0, description="seed of everything: init, streams, augmentation, round draws")
    resume: str = Field("auto", description="auto (latest checkpoint if any) | never | a checkpoint path")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every N training steps; 0: off")
    keep_last: int = Field(3, ge=1, description="checkpoints kept besides the best")
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None, description="through Accelerate; None: the launcher's setting")
    num_processes: int | None = Field(
        None, ge=1, description="expected world size, checked at start; None: the launcher's")
    collective_timeout_s: float = Field(
        600.0, gt=0.0, description="the longest any process waits in a collective (a dead or hung peer): "
        "then it fails, non-zero, instead of hanging; above the longest checkpoint or export write")
    debug: bool = Field(False, description="check the target table across processes after every rewrite")
    tensorboard: bool = Field(False, description="also log to TensorBoard (needs the tensorboard extra)")
    log_every: int = Field(10, ge=1, description="log the step loss every N steps (the loss is read back "
                           "to the host only then)")
    stop_check_every: int = Field(10, ge=1, description="agree on a stop request (SIGTERM/SIGUSR1) every N "
                                  "steps and at each epoch's end: a collective and a host sync each time")
    eval_batch_size: int = Field(256, ge=1, description="per-process batch of prediction and evaluation")
    progress: bool = Field(True, description="rich progress bars on the main process")
    progress_every_s: float = Field(30.0, gt=0.0, description="a plain progress line every N s where the "
                                    "output is not a terminal (a SLURM log)")
    max_requeues: int = Field(20, ge=0, description="SLURM: most requeues on the time-limit signal (SIGUSR1)")
    stop_after_rounds: int | None = Field(None, ge=0, description="exit, checkpointed, after N rounds")
    warmup_from: str | None = Field(None, description="a run folder whose finished warm-up this run starts "
                                    "its rounds from (its data, model, optim, seed and warm-up keys must be "
                                    "this run's), where this run has no checkpoint of its own")


class TrainConfig(_Section):
    """The whole training config."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("run")
    @classmethod
    def _name_is_a_folder(cls, run: RunConfig) -> RunConfig:
        if "/" in run.name or run.name in (".", ".."):
            raise ValueError("must be a plain folder name")
        return run

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        if self.model.backbone == "vggface" and self.model.pretrained and not self.model.weights:
            raise ValueError("model.weights: vggface with pretrained: true needs a local weights file "
                             "(or set model.pretrained: false)")
        for part in ("labelled", "val"):
            if not getattr(self.data, part):
                raise ValueError(f"data.{part}: name at least one shard directory and split")
        if self.method.self_training and self.method.use_unlabelled and not self.data.unlabelled:
            raise ValueError("data.unlabelled: empty while method.use_unlabelled is true")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for YAML and checkpoints."""
        return self.model_dump(mode="json")


# What a warm-up depends on: an arm may start its rounds from another run's warm-up only where these agree.
WARMUP_KEYS = ("data", "model", "optim", "method.label_smoothing", "method.eps", "method.warmup_epochs",
               "method.warmup_patience", "run.seed", "run.mixed_precision")


def warmup_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The WARMUP_KEYS leaves of a config dict, flat (`optim.lr`: value): equal identities, equal warm-ups."""
    def leaves(tree: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        return {k: v for name, sub in tree.items() for k, v in leaves(sub, f"{prefix}.{name}").items()}

    out: dict[str, Any] = {}
    for key in WARMUP_KEYS:
        section, _, leaf = key.partition(".")
        part = config.get(section, {})
        out.update(leaves({leaf: part.get(leaf)} if leaf else part, section))
    out.pop("model.sync_bn", None)  # how the network is trained across processes, not what it learns
    return out


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not ShardsRef:
            paths += _leaf_paths(ann, f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths


LEAVES = _leaf_paths(TrainConfig)


def _resolve_key(key: str) -> str:
    """Full dotted path of a key; a bare leaf name (`tau`) works where it is unique; a section as a whole."""
    if key in LEAVES or key in TrainConfig.model_fields:
        return key
    matches = [p for p in LEAVES if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise FerDistError(f"config: {key!r} is ambiguous ({', '.join(matches)}); use the full key")
    raise FerDistError(f"config: unknown key {key!r}{did_you_mean(key)}")


def did_you_mean(key: str) -> str:
    """`; did you mean 'method.tau'?` for a mistyped key (a dotted path or a bare leaf name), or ''."""
    import difflib

    pool = {p: p for p in LEAVES}
    parent, _, _ = key.rpartition(".")
    if parent:  # a shard entry's own keys: data.labelled.0.dirr -> data.labelled.0.dir
        pool.update({f"{parent}.{f}": f"{parent}.{f}" for f in ShardsRef.model_fields})
    else:
        pool.update({p.rsplit(".", 1)[-1]: p for p in LEAVES})
    close = difflib.get_close_matches(key, list(pool), n=1, cutoff=0.6)
    return f"; did you mean {pool[close[0]]!r}?" if close else ""


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise FerDistError(f"config: {p!r} is not a section")
        tree = node
    tree[leaf] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings into a nested dict; values are YAML (`tau=0.8`, `data.labelled=[...]`)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FerDistError(f"config override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            raise FerDistError(f"config override {key}: not a YAML value ({e.__class__.__name__})") from None
        _set(tree, _resolve_key(key.strip()), value)
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = f"unknown key{did_you_mean(loc)}"
    elif "input" in first and not isinstance(first["input"], dict):
        msg += f" (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc + ': ' if loc else ''}{msg}{more}"


def build_config(tree: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a nested dict into a TrainConfig; errors name the key."""
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise FerDistError(_one_line(e, source)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file, with one-line errors naming the file."""
    if not path.is_file():
        raise FerDistError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise FerDistError(f"{path}:{where} not valid YAML") from None
    if not isinstance(tree, dict):
        raise FerDistError(f"{path}: expected a mapping of config sections at the top level")
    return tree


DATA_KEYS = ("data.labelled", "data.unlabelled", "data.val", "data.test")  # the keys that name shard folders


def overrides_name_data(overrides: list[str]) -> bool:
    """Whether any override names shard folders (data.labelled/unlabelled/val/test, or `data` whole).

    The quick start may shard the synthetic set only where the user named no data at all: a mistyped
    folder must be an error, never replaced by synthetic faces.
    """
    keys = parse_overrides(list(overrides))
    return "data" in keys and (not isinstance(keys["data"], dict)
                               or any(k.removeprefix("data.") in keys["data"] for k in DATA_KEYS))


def load_config(path: Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults < YAML file < overrides, validated once at the end."""
    tree = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    if overrides:
        tree = _merge(tree, parse_overrides(list(overrides)))
        source += " + overrides"
    return build_config(tree, source)


def dump_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, one-line doc) of every config leaf, in declaration order: the --help listing."""
    rows = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not ShardsRef:
                walk(ann, f"{prefix}{name}.")
                continue
            default = "[]" if field.default_factory is list else "required" if field.is_required() else (
                yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix("\n..."))
            rows.append((prefix + name, default, field.description or ""))

    walk(TrainConfig, "")
    return rows


def keys_help() -> str:
    """Every config key with its default and doc: the --help of `fer-dist train` and `-m fer_dist.train`."""
    rows = describe_keys()
    width = max(len(key) + len(default) for key, default, _ in rows) + 3
    lines = [f"  {f'{key} = {default}':<{width}} {doc}" for key, default, doc in rows]
    return "config keys (key = default, one-line doc):\n" + "\n".join(lines)
