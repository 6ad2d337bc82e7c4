"""An experiment definition (launch_configs/experiments/*.yaml), read and checked before anything runs.

    name: fer2013_ablation              # records go to docs/results/<name>.json
    kind: ablation                      # or crossdb: which of the paper's comparisons RESULTS.md reads
    description: one line for RESULTS.md
    base: launch_configs/train/fer2013_mobilenet_cpu.yaml   # the training config every arm starts from
    schedule: {method.warmup_epochs: 3}  # overrides every arm gets (the schedule, the machine's settings)
    env: {TORCH_HOME: ../shared/torch_home}
    launch: {}                          # one process; or {accelerate_config: launch_configs/accelerate/...}
    shared_warmup: true                 # optional: each seed's warm-up trained once (warmup-<arm>-s<seed>)
                                        # and every arm with that warm-up starts its rounds from it
                                        # (run.warmup_from); arms whose warm-up keys differ get their own
    code: cb96b42                       # optional: train with the fer_dist of this commit (every arm and seed
                                        # of an experiment on one code, however main moves between sessions)
    curve: fer2013_scarce               # optional: a point of the labelled-share curve named after an
                                        # experiment (which is a point of it too); the share is read from
                                        # data.labelled's `share` (none: 1.0); the README draws test accuracy
                                        # against it, per arm
    seeds: [0, 1, 2]
    shards:                             # what `fer-dist shard` makes first where the folder is missing
      - {dataset: fer2013, src: ../shared/data/fer2013, out: shards/fer2013}
    test: [{dir: shards/fer2013, splits: [test]}]    # the first is the record's test set; more are extra
    intensity: {dir: shards/synthetic, splits: [test]}   # optional: the synthetic set's true intensity
    arms:                               # arm -> the overrides that make it
      baseline: {method.label_smoothing: false, method.self_training: false}
    reading:                            # optional, for RESULTS.md's reading against the paper
      setting: how this setting differs from the paper's (why its gains may differ), one paragraph
      levels: true                      # whether the baseline's level is comparable with the paper's 69.57 %

Relative paths are relative to the working directory (the repository root, as for the trainer). Every
error names the file and the field, on one line.

What the report is told beyond a definition lies beside the records, in <results-dir>/notes.yaml (so that
a runner of an older commit, which refuses keys it does not know, still reads every definition):

    fer2013_converged: {retired: why, in one line}   # RESULTS.md keeps its records but reads nothing
    crossdb_fer2013_ckplus48: {frames_per_sequence: 3}   # near-identical frames per test sequence (CK+48):
                                                          # the standard error counts n / 3 faces
    fer2013_scarce_dlib: {against: fer2013_scarce}   # its arms against the same-named arms there, paired
                                                      # by seed where X_l is the same (another backbone)
    fer2013_dlib: {readme: the question it answers}   # a table of it in the README's results block
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fer_dist.config import load_config
from fer_dist.errors import FerDistError

KEYS = {"name", "kind", "description", "base", "schedule", "env", "launch", "seeds", "shards", "test",
        "intensity", "arms", "code", "reading", "shared_warmup", "curve"}
NOTE_KEYS = {"retired", "frames_per_sequence", "against", "readme"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class SetRef:
    """Some splits of one shard folder: a test set, or the intensity set."""

    dir: str
    splits: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{Path(self.dir).name}:{','.join(self.splits)}"


@dataclass(frozen=True)
class Experiment:
    """A checked experiment definition."""

    path: Path
    name: str
    kind: str
    description: str
    base: Path
    schedule: dict[str, Any]
    env: dict[str, str]
    accelerate_config: str | None
    seeds: tuple[int, ...]
    shards: tuple[dict[str, Any], ...]
    test: tuple[SetRef, ...]
    intensity: SetRef | None
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    code: str | None = None
    setting: str = ""
    compare_levels: bool = False
    shared_warmup: bool = False
    curve: str | None = None
    retired: str = ""
    frames_per_sequence: int = 1
    against: str | None = None
    readme: str = ""

    def overrides(self, arm: str, seed: int, run_dir: Path, extra: list[str] = ()) -> list[str]:
        """key=value overrides of one arm and seed: schedule < arm < the runner's run.* < extra."""
        tree = {**self.schedule, **self.arms[arm]}
        out = [f"{k}={json.dumps(v)}" for k, v in tree.items()]  # JSON values are YAML values
        out += [f"run.name={run_dir.name}", f"run.dir={run_dir.parent}", f"run.seed={seed}",
                "run.resume=auto", "run.progress=false"]
        return out + list(extra)

    def labelled_share(self, arm: str | None = None) -> float | None:
        """The share of its splits' labelled faces X_l keeps (data.labelled's `share`, 1.0 where none),
        resolved as the arm (default: the first) trains; None where its folders keep different shares."""
        cfg = load_config(self.base, self.overrides(arm or next(iter(self.arms)), self.seeds[0],
                                                    Path("runs") / "check"))
        shares = {1.0 if ref.share is None else ref.share for ref in cfg.data.labelled}
        return shares.pop() if len(shares) == 1 else None


def _fail(path: Path, where: str, msg: str) -> FerDistError:
    return FerDistError(f"{path}: {where}: {msg}")


def _set_ref(path: Path, where: str, value: Any) -> SetRef:
    if not (isinstance(value, dict) and set(value) == {"dir", "splits"} and isinstance(value["dir"], str)
            and isinstance(value["splits"], list) and value["splits"]
            and all(isinstance(s, str) for s in value["splits"])):
        raise _fail(path, where, "expected {dir: FOLDER, splits: [NAME, ...]}")
    return SetRef(value["dir"], tuple(value["splits"]))


def _mapping(path: Path, tree: dict, key: str) -> dict:
    value = tree.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(path, key, "expected a mapping")
    return value


def read_experiment(path: Path, *, check_configs: bool = True) -> Experiment:
    """Read and check `path`; with check_configs, every arm's training config is validated too."""
    if not path.is_file():
        raise FerDistError(f"{path}: experiment file not found")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise FerDistError(f"{path}: not valid YAML") from None
    if not isinstance(tree, dict):
        raise FerDistError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(tree) - KEYS)
    if unknown:
        raise _fail(path, unknown[0], "unknown key")
    for key in ("name", "base", "arms", "test"):
        if key not in tree:
            raise _fail(path, key, "required")
    name = tree["name"]
    if not isinstance(name, str) or not NAME.match(name):
        raise _fail(path, "name", "a plain name (letters, digits, _ . -)")
    arms = _mapping(path, tree, "arms")
    if not arms:
        raise _fail(path, "arms", "name at least one arm")
    for arm, value in arms.items():
        if not isinstance(arm, str) or not NAME.match(arm):
            raise _fail(path, f"arms.{arm}", "a plain name")
        if not isinstance(value, dict):
            raise _fail(path, f"arms.{arm}", "expected a mapping of config keys to values")
    seeds = tree.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool)
                                                       for s in seeds)) or len(set(seeds)) != len(seeds):
        raise _fail(path, "seeds", "a list of distinct integers")
    launch = _mapping(path, tree, "launch")
    if set(launch) - {"accelerate_config"}:
        raise _fail(path, "launch", "the one key is accelerate_config (none: one process, python -m)")
    accel = launch.get("accelerate_config")
    if accel is not None and not Path(accel).is_file():
        raise _fail(path, "launch.accelerate_config", f"{accel} not found")
    shards = tree.get("shards") or []
    if not isinstance(shards, list):
        raise _fail(path, "shards", "expected a list")
    for i, spec in enumerate(shards):
        if not (isinstance(spec, dict) and {"dataset", "out"} <= set(spec)
                and set(spec) <= {"dataset", "src", "out", "args"}):
            raise _fail(path, f"shards[{i}]", "expected {dataset, out[, src][, args: [...]]}")
    tests = tree["test"]
    if not isinstance(tests, list) or not tests:
        raise _fail(path, "test", "a list of {dir, splits}, at least one")
    code = tree.get("code")
    if code is not None and not (isinstance(code, str) and re.fullmatch(r"[0-9a-f]{7,40}", code)):
        raise _fail(path, "code", "a commit's hash (7 to 40 hex digits)")
    shared_warmup = tree.get("shared_warmup", False)
    if not isinstance(shared_warmup, bool):
        raise _fail(path, "shared_warmup", "true or false")
    kind = tree.get("kind", "ablation")
    if kind not in ("ablation", "crossdb"):
        raise _fail(path, "kind", f"ablation or crossdb (got {kind!r})")
    reading = _mapping(path, tree, "reading")
    if set(reading) - {"setting", "levels"}:
        raise _fail(path, "reading", "the keys are setting (text) and levels (true or false)")
    if not isinstance(reading.get("setting", ""), str) or not isinstance(reading.get("levels", False), bool):
        raise _fail(path, "reading", "setting is text, levels is true or false")
    if not (tree.get("curve") is None or (isinstance(tree["curve"], str) and NAME.match(tree["curve"]))):
        raise _fail(path, "curve", "the name of the experiment whose curve this is a point of")
    exp = Experiment(
        path=path, name=name, kind=kind, description=str(tree.get("description", "")),
        base=Path(tree["base"]), schedule=_mapping(path, tree, "schedule"),
        env={str(k): str(v) for k, v in _mapping(path, tree, "env").items()}, accelerate_config=accel,
        seeds=tuple(seeds), shards=tuple(shards),
        test=tuple(_set_ref(path, f"test[{i}]", t) for i, t in enumerate(tests)),
        intensity=_set_ref(path, "intensity", tree["intensity"]) if tree.get("intensity") else None,
        arms=arms, code=code, setting=" ".join(reading.get("setting", "").split()),
        compare_levels=reading.get("levels", False), shared_warmup=shared_warmup,
        curve=tree.get("curve"),
    )
    if not exp.base.is_file():
        raise _fail(path, "base", f"{exp.base} not found")
    if check_configs:
        for arm in arms:
            try:
                # the same overrides the runner passes: a bad key fails here, before any arm has run
                load_config(exp.base, exp.overrides(arm, exp.seeds[0], Path("runs") / "check"))
            except FerDistError as e:
                raise _fail(path, f"arms.{arm}", str(e)) from None
    return exp


def with_notes(experiments: list[Experiment], path: Path) -> list[Experiment]:
    """The experiments with what <results-dir>/notes.yaml says of them (no file: as they are)."""
    if not path.is_file():
        return experiments
    try:
        notes = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise FerDistError(f"{path}: not valid YAML") from None
    names = {exp.name for exp in experiments}
    if not isinstance(notes, dict):
        raise FerDistError(f"{path}: expected experiment -> {{retired: text, frames_per_sequence: N, "
                           "against: experiment, readme: question}}")
    for name, note in notes.items():
        if name not in names:
            raise _fail(path, str(name), "no experiment of that name")
        if not isinstance(note, dict) or set(note) - NOTE_KEYS:
            raise _fail(path, name, f"the keys are {', '.join(sorted(NOTE_KEYS))}")
        frames = note.get("frames_per_sequence", 1)
        if not (isinstance(frames, int) and not isinstance(frames, bool) and frames >= 1):
            raise _fail(path, f"{name}.frames_per_sequence", "an integer of at least 1")
        if not isinstance(note.get("retired", ""), str):
            raise _fail(path, f"{name}.retired", "text: why, in one line")
        against = note.get("against")
        if against is not None and not (isinstance(against, str) and against in names - {name}):
            raise _fail(path, f"{name}.against", "the name of another experiment")
        if not isinstance(note.get("readme", ""), str):
            raise _fail(path, f"{name}.readme", "text: the question it answers")
    return [replace(exp, retired=" ".join(notes.get(exp.name, {}).get("retired", "").split()),
                    frames_per_sequence=notes.get(exp.name, {}).get("frames_per_sequence", 1),
                    against=notes.get(exp.name, {}).get("against"),
                    readme=" ".join(notes.get(exp.name, {}).get("readme", "").split()))
            for exp in experiments]
