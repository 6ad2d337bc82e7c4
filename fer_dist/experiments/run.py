"""Run an experiment's arms and seeds, recording each one as it finishes; rerun to continue.

    fer-dist experiment run launch_configs/experiments/fer2013_ablation.yaml [--seeds 0,1] [--arms a,b] \
        [--runs-dir runs/experiments] [--results-dir docs/results] [--dry-run] [--set key=value ...]
    fer-dist experiment report          # docs/RESULTS.md and the README's block from docs/results/*.json
    fer-dist experiment submit EXP.yaml # the same tasks as a SLURM job array (fer_dist/experiments/submit.py)

For each seed, then each arm (so that an interrupted experiment has every arm of the first seeds):
skip it where docs/results/<experiment>.json already records (arm, seed); else shard what the experiment
needs (once), train (`python -m fer_dist.train`, or `accelerate launch` with the experiment's accelerate
config) in runs/experiments/<experiment>/<arm>-s<seed> with run.resume=auto, so a run killed mid-arm
continues from its last checkpoint; then test its best model and append the record (atomically, under a
file lock). An arm whose training is exactly that of a run another experiment already recorded (the same
resolved config apart from where the run lives, the same launch) is not trained again: that run's best
model is tested on this experiment's sets and the record names it (`trained_for`), keeping its training
figures. A SIGTERM or SIGINT to the runner is passed to the training as SIGTERM, a SIGUSR1 (SLURM's
time-limit warning) as SIGUSR1, so that the trainer checkpoints and stops; after a SIGUSR1 inside a SLURM job
the runner, once the training has ended, requeues the task (`slurm.requeue_stopped`: counted and limited in
the run directory); it then raises Stopped (exit 3) without a record.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fer_dist import slurm
from fer_dist.config import load_config, warmup_identity
from fer_dist.errors import FerDistError
from fer_dist.experiments.records import add_record, commit, machine, read_records, recorded
from fer_dist.experiments.spec import Experiment, read_experiment
from fer_dist.files import write_text_atomic

WALL_FILE = "experiment_wall.json"  # beside the run: training seconds summed over the runner's attempts
PLACE_KEYS = ("name", "dir", "resume", "progress")  # run.* keys that place a run, not what it trains


class Stopped(Exception):
    """The runner was asked to stop; the training checkpointed."""


def shard_commands(exp: Experiment) -> list[list[str]]:
    """`fer-dist shard` for each shard folder the experiment names that does not exist yet."""
    out = []
    for spec in exp.shards:
        if (Path(spec["out"]) / "manifest.json").exists():
            continue
        cmd = [sys.executable, "-m", "fer_dist.cli", "shard", "--dataset", spec["dataset"],
               "--out", spec["out"]]
        if spec.get("src"):
            cmd += ["--src", str(spec["src"])]
        out.append(cmd + [str(a) for a in spec.get("args", [])])
    return out


def train_command(exp: Experiment, arm: str, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    """The training command of one arm and seed."""
    args = ["-m", "fer_dist.train", "--config", str(exp.base), *exp.overrides(arm, seed, run_dir, extra)]
    if exp.accelerate_config is None:
        return [sys.executable, *args]
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--config_file", exp.accelerate_config, *args]


def environment(exp: Experiment, code: Path | None = None) -> dict[str, str]:
    """The training's environment: ours plus the experiment's (relative paths made absolute); with a
    pinned `code` checkout, its fer_dist first: PYTHONSAFEPATH keeps `python -m` (and the processes
    accelerate starts) from putting the working directory, this checkout, ahead of PYTHONPATH."""
    env = dict(os.environ)
    for key, value in exp.env.items():
        env[key] = str(Path(value).resolve()) if ("/" in value or value.startswith(".")) else value
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code.resolve()), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONSAFEPATH"] = "1"
    return env


def code_checkout(exp: Experiment, runs_dir: Path) -> Path | None:
    """The experiment's pinned commit checked out (a detached git worktree under runs_dir/code/), or None."""
    if exp.code is None:
        return None
    path = runs_dir / "code" / exp.code
    if not (path / "fer_dist" / "train.py").is_file():
        made = subprocess.run(["git", "worktree", "add", "--detach", str(path), exp.code],
                              capture_output=True, text=True)
        if made.returncode:
            raise FerDistError(f"{exp.path}: code: cannot check out {exp.code}: "
                               f"{' '.join(made.stderr.split())}")
    return path


def code_commit(code: Path | None) -> str:
    """The commit the training runs: the pinned checkout's, else this checkout's."""
    if code is None:
        return commit()
    return subprocess.run(["git", "-C", str(code), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def run_child(cmd: list[str], env: dict[str, str], run_dir: Path | None = None) -> int:
    """Run a child to its end; SIGTERM / SIGINT / SIGUSR1 to the runner are passed on and end the runner
    after it (a SIGUSR1 inside a SLURM job requeues the job of `run_dir`'s training first)."""
    proc = subprocess.Popen(cmd, env=env)
    asked: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        asked.append(signum)
        # the trainer's stop request: checkpoint at a step and exit 0
        proc.send_signal(signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if asked and asked[0] == signal.SIGUSR1 and run_dir is not None and slurm.job_id() and code == 0:
        print(slurm.requeue_stopped(run_dir), flush=True)  # the requeued runner resumes the run
    if asked:
        raise Stopped(f"stopped by signal {asked[0]}; rerun the same command to continue")
    return code


def add_wall(run_dir: Path, seconds: float) -> float:
    """Add one attempt's seconds to the run's total and return the total."""
    path = run_dir / WALL_FILE
    total = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
    total += seconds
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"seconds": total}) + "\n")
    return total


def make_record(exp: Experiment, arm: str, seed: int, run_dir: Path, wall: float,
                trained_at: str) -> dict[str, Any]:
    """The record of a finished run: its log, and its best model tested on the experiment's sets.

    `trained_at` is the commit the finishing attempt started its training from (not the one at recording
    time: commits landing while an arm trains do not change the code it runs)."""
    from fer_dist.experiments.measure import intensity_metric, load_best, run_record, score_set

    logged = run_record(run_dir)
    net = load_best(run_dir)
    tests = [dict(score_set(net, t.dir, t.splits), test_set=t.name) for t in exp.test]
    record = {
        "arm": arm, "seed": seed, "test_set": tests[0]["test_set"],
        "test_accuracy": tests[0]["accuracy"], "macro_f1": tests[0]["macro_f1"], "uar": tests[0]["uar"],
        "n_test": tests[0]["n"], **logged, "wall_s": round(wall, 1), "commit": trained_at,
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "run_dir": str(run_dir),
    }
    if len(tests) > 1:
        record["other_tests"] = tests[1:]
    if exp.intensity is not None:
        record["intensity"] = intensity_metric(net, exp.intensity.dir, exp.intensity.splits)
    return record


def training_identity(config_path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """The resolved training config without the keys that only place the run."""
    tree = load_config(config_path, overrides).model_dump()
    tree["run"] = {k: v for k, v in tree["run"].items() if k not in PLACE_KEYS}
    return tree


def recorded_twin(exp: Experiment, arm: str, seed: int, results: Path, extra: list[str]) -> dict | None:
    """A record of another experiment whose finished run trained exactly what this arm would, else None."""
    want = training_identity(exp.base, exp.overrides(arm, seed, Path("runs/check"), extra))
    for path in sorted(results.parent.glob("*.json")):
        spec_path = exp.path.parent / f"{path.stem}.yaml"
        if path == results or not spec_path.is_file():
            continue
        if read_experiment(spec_path, check_configs=False).accelerate_config != exp.accelerate_config:
            continue
        for rec in read_records(path):
            run_dir = Path(rec.get("run_dir", ""))
            if int(rec["seed"]) == seed and (run_dir / "summary.json").is_file() and \
                    training_identity(run_dir / "config.yaml", []) == want:
                return dict(rec, experiment=path.stem)
    return None


def warmup_runs(exp: Experiment, arms: list[str], seed: int, runs_dir: Path, extra: list[str]
                ) -> dict[str, Path]:
    """With shared_warmup: arm -> the run folder of the warm-up it starts from (`warmup-<arm>-s<seed>`,
    named after the first arm of the experiment with that warm-up); {} without."""
    if not exp.shared_warmup:
        return {}
    out, seen = {}, {}
    for arm in exp.arms:  # the file's order: a warm-up's name does not depend on --arms
        ident = warmup_identity(load_config(exp.base, exp.overrides(arm, seed, Path("runs/check"),
                                                                    extra)).to_dict())
        key = json.dumps(ident, sort_keys=True)
        seen.setdefault(key, runs_dir / exp.name / f"warmup-{arm}-s{seed}")
        if arm in arms:
            out[arm] = seen[key]
    return out


def warmup_extra(extra: list[str]) -> list[str]:
    """The overrides of a shared warm-up run: the arm's, and no rounds after it."""
    return [*extra, "method.self_training=false"]


def train_warmup(exp: Experiment, arm: str, seed: int, run_dir: Path, extra: list[str],
                 env: dict[str, str]) -> None:
    """Train the shared warm-up of `arm`'s seed where it has not finished (resumable like any run)."""
    if (run_dir / "summary.json").exists():
        return
    cmd = train_command(exp, arm, seed, run_dir, warmup_extra(extra))
    print(f"{exp.name}: the warm-up of seed {seed} (shared)\n$ " + shlex.join(cmd), flush=True)
    tick = time.monotonic()
    try:
        code = run_child(cmd, env, run_dir)
    finally:
        add_wall(run_dir, time.monotonic() - tick)
    if code:
        raise FerDistError(f"{exp.name}: the warm-up of seed {seed} ({run_dir}): training exited {code}")
    if not (run_dir / "summary.json").exists():
        raise Stopped(f"{run_dir}: the warm-up stopped before its end; rerun to continue")


def check_warmup(results: Path, seed: int, warm: Path) -> None:
    """Refuse an arm of `seed` whose shared warm-up is not the one the seed's recorded arms started from
    (its run folder lost and the warm-up trained again, here or on another CPU, whose arithmetic differs):
    its arms would not pair with theirs (`stats.same_start`)."""
    from fer_dist.experiments.measure import run_record
    from fer_dist.experiments.stats import same_start

    mine = {"warmup_run": str(warm), "val_per_warmup_epoch": run_record(warm)["val_per_warmup_epoch"]}
    other = [r for r in read_records(results) if int(r["seed"]) == seed and not same_start(r, mine)]
    if other:
        raise FerDistError(
            f"{results}: seed {seed}: its recorded arms ({', '.join(r['arm'] for r in other)}) started from "
            f"another warm-up than {warm} (trained on {other[0]['machine']}); arms of the two would not "
            "pair: run the new arms on a seed with no records (--seeds)")


def run_experiment(exp: Experiment, *, seeds: list[int], arms: list[str], runs_dir: Path, results: Path,
                   extra: list[str], dry_run: bool = False, warmup_only: bool = False) -> int:
    """Every (seed, arm) not yet recorded: train, test, record; with warmup_only, only the shared warm-ups
    of the seeds (what a SLURM warm-up job runs before the arms of its seed). Returns the exit code."""
    checkout = None if dry_run else code_checkout(exp, runs_dir)
    env = environment(exp, checkout)
    if checkout is not None:
        print(f"{exp.name}: training with the fer_dist of {exp.code} ({checkout})", flush=True)
    for cmd in shard_commands(exp):
        print("$ " + shlex.join(cmd), flush=True)
        if not dry_run and run_child(cmd, env):
            raise FerDistError(f"{exp.path}: shards: `{' '.join(cmd)}` failed")
    for seed in seeds:
        warmups = warmup_runs(exp, arms, seed, runs_dir, extra)
        if warmup_only:
            firsts: dict[Path, str] = {}
            for arm, warm in warmups.items():
                firsts.setdefault(warm, arm)  # each warm-up once, trained as its first arm's
            for warm, arm in firsts.items():
                if dry_run:
                    print(f"{exp.name}: the warm-up of seed {seed} (shared)\n$ "
                          + shlex.join(train_command(exp, arm, seed, warm, warmup_extra(extra))), flush=True)
                else:
                    train_warmup(exp, arm, seed, warm, extra, env)
            continue
        for arm in arms:
            if (arm, seed) in recorded(read_records(results)):
                print(f"{exp.name}: {arm} seed {seed}: recorded, skipped", flush=True)
                continue
            warm = warmups.get(arm)
            arm_extra = extra if warm is None else [*extra, f"run.warmup_from={warm}"]
            twin = recorded_twin(exp, arm, seed, results, arm_extra)
            if twin is not None:
                print(f"{exp.name}: {arm} seed {seed}: trained as {twin['experiment']} {twin['arm']} "
                      f"({twin['run_dir']}); testing its model", flush=True)
                if not dry_run:
                    record = make_record(exp, arm, seed, Path(twin["run_dir"]), twin["wall_s"],
                                         twin["commit"])
                    add_record(results, dict(record, trained_for=f"{twin['experiment']}:{twin['arm']}"))
                    print(f"{exp.name}: {arm} seed {seed}: test accuracy {record['test_accuracy']:.4f} "
                          f"({record['test_set']}) -> {results}", flush=True)
                continue
            run_dir = runs_dir / exp.name / f"{arm}-s{seed}"
            if warm is not None and not dry_run:
                train_warmup(exp, arm, seed, warm, extra, env)
                check_warmup(results, seed, warm)
            cmd = train_command(exp, arm, seed, run_dir, arm_extra)
            print(f"{exp.name}: {arm} seed {seed}\n$ " + shlex.join(cmd), flush=True)
            if dry_run:
                continue
            tick, trained_at = time.monotonic(), code_commit(checkout)
            try:
                code = run_child(cmd, env, run_dir)
            finally:
                wall = add_wall(run_dir, time.monotonic() - tick)
            if code:
                print(f"error: {exp.name}: {arm} seed {seed}: training exited {code}", file=sys.stderr)
                return 1
            if not (run_dir / "summary.json").exists():  # the trainer stopped on a request of its own
                raise Stopped(f"{run_dir}: the training stopped before its end; rerun to continue")
            record = make_record(exp, arm, seed, run_dir, wall, trained_at)
            if warm is not None:  # its warm-up's time is the warm-up run's, shared by the arms of the seed
                record.update(warmup_run=str(warm),
                              warmup_wall_s=round(json.loads((warm / WALL_FILE).read_text())["seconds"], 1))
            add_record(results, record)
            print(f"{exp.name}: {arm} seed {seed}: test accuracy {record['test_accuracy']:.4f} "
                  f"({record['test_set']}), macro-F1 {record['macro_f1']:.4f}, {wall:.0f} s -> {results}",
                  flush=True)
    return 0


def selection(exp: Experiment, seeds: list[int] | None, arms: list[str] | None,
              extra: list[str]) -> tuple[list[int], list[str]]:
    """The seeds and arms asked for (default: the file's), checked with the extra overrides before
    anything runs: an unknown arm or a bad override is one line naming it."""
    unknown = [a for a in arms or [] if a not in exp.arms]
    if unknown:
        raise FerDistError(f"--arms: {unknown[0]!r} is not an arm of {exp.path} ({', '.join(exp.arms)})")
    if extra:  # checked before the first arm runs, as the file's own overrides are
        load_config(exp.base, exp.overrides(next(iter(exp.arms)), 0, Path("runs/check"), extra))
    return list(seeds or exp.seeds), list(arms or exp.arms)
