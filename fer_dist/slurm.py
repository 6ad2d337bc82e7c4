"""SLURM: requeueing a run stopped by its time-limit warning, with a count kept in the run directory, and the
batch scripts of `tools/slurm/` rendered with a job's values (`fer-dist slurm submit`).

The requeue is the batch script's: it traps the warning (`--signal=B:USR1@90`), forwards it to the ranks,
and once `srun` has returned 0 runs `python -m fer_dist.slurm requeue <the trainer's arguments>`, which
requeues the job (`scontrol requeue`) unless the run has finished. By then every rank of every node has
ended, so nothing is cut short. A requeue is refused (and the reason written) once `run.max_requeues` is
reached, or when the run has not trained a step since its last requeue: a run that cannot make progress
within its time limit must not cycle through the queue forever.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fer_dist.errors import FerDistError
from fer_dist.files import write_text_atomic
from fer_dist.resources import resource_path

SCRIPTS = resource_path("slurm")  # tools/slurm/'s templates, shipped in the package
REQUEUES = "requeues.json"


def job_id() -> str | None:
    """The SLURM job this process runs in, or None."""
    return os.environ.get("SLURM_JOB_ID") or None


def read_requeues(run_dir: Path) -> dict[str, Any]:
    """The run's requeue record: {"requeues": [...], "refused": null | {...}} (empty where there is none)."""
    path = Path(run_dir) / REQUEUES
    if not path.exists():
        return {"requeues": [], "refused": None}
    return json.loads(path.read_text())


def requeue(run_dir: Path, *, step: int, limit: int) -> str:
    """Requeue this job (`scontrol requeue`) unless the limit or a lack of progress forbids it; the record
    is written first, so a requeued job finds its count. Returns a line for the log."""
    record = read_requeues(run_dir)
    done = record["requeues"]
    entry = {"job_id": job_id(), "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step}
    reason = None
    if len(done) >= limit:
        reason = f"run.max_requeues ({limit}) reached"
    elif done and done[-1]["step"] == step:
        reason = f"no training step since the last requeue (step {step}): the time limit is too short"
    if reason is None:
        done.append(entry)
        record["refused"] = None
    else:
        record["refused"] = {**entry, "reason": reason}
    write_text_atomic(Path(run_dir) / REQUEUES, json.dumps(record, indent=2) + "\n")
    if reason is not None:
        return f"not requeued: {reason} ({run_dir / REQUEUES})"
    result = subprocess.run(["scontrol", "requeue", str(entry["job_id"])], capture_output=True, text=True)
    if result.returncode != 0:
        return f"scontrol requeue {entry['job_id']} failed: {result.stderr.strip() or result.returncode}"
    return f"requeued job {entry['job_id']} ({len(done)} of at most {limit}); it resumes from this checkpoint"


def requeue_stopped(run_dir: Path) -> str:
    """Requeue the job of a run that stopped with a checkpoint and has not finished (its limit: the run's
    config.yaml); returns a line for the log."""
    from fer_dist.checkpoint_files import latest_checkpoint, read_meta
    from fer_dist.config import load_config

    latest = latest_checkpoint(run_dir)
    if (run_dir / "summary.json").is_file() or latest is None:
        return f"not requeued: {run_dir} has {'finished' if latest else 'no checkpoint'}"
    limit = load_config(run_dir / "config.yaml").run.max_requeues
    return requeue(run_dir, step=int(read_meta(latest)["step"]), limit=limit)


def main(argv: list[str] | None = None) -> int:
    """`python -m fer_dist.slurm requeue [--config FILE] [key=value ...]`: the trainer's arguments name the
    run (as `python -m fer_dist.train` resolves them)."""
    from fer_dist.config import load_config
    from fer_dist.quickstart import QUICKSTART

    parser = argparse.ArgumentParser(prog="python -m fer_dist.slurm", description=main.__doc__)
    parser.add_argument("command", choices=["requeue"])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # requeue --config FILE key=value ...
    try:
        cfg = load_config(args.config or QUICKSTART, args.overrides)
        line = requeue_stopped(Path(cfg.run.dir) / cfg.run.name)
    except FerDistError as e:
        line = f"not requeued: {e}"
    print(f"[{time.strftime('%H:%M:%S')}] fer-dist: {line}", flush=True)
    return 0


@dataclass
class JobSpec:
    """What `fer-dist slurm submit` fills into a batch script."""

    nodes: int
    gpus_per_node: int
    train_args: list[str]
    partition: str | None = None
    time_limit: str | None = None
    job_name: str = "fer-dist"
    cpus_per_task: int | None = None
    cpu: bool = False  # CPU ranks (gloo): gpus_per_node is then the processes per node
    output: str | None = None  # the job's log; None: the script's %x-%j.out in the submit directory
    script: Path | None = None  # the template; None: single_node.sbatch for one node, else multi_node.sbatch


def script_for(spec: JobSpec) -> Path:
    """The script a job of this size uses."""
    if spec.script is not None:
        if not spec.script.is_file():
            raise FerDistError(f"--script: {spec.script} is not a file")
        return spec.script
    return SCRIPTS / ("single_node.sbatch" if spec.nodes == 1 else "multi_node.sbatch")


PYTHON_DEFAULT = "${FER_DIST_PYTHON:-.venv/bin/python}"  # the templates' own, for `sbatch TEMPLATE`


def this_python(line: str) -> str:
    """A template line with the default Python made the one rendering it: a fer-dist installed from a wheel
    has no .venv in the submit directory, and `sys.executable` is the interpreter that has fer-dist."""
    return line.replace(PYTHON_DEFAULT, "${FER_DIST_PYTHON:-" + shlex.quote(sys.executable) + "}")


def render(spec: JobSpec) -> str:
    """The batch script with the job's #SBATCH values and its training arguments filled in."""
    if spec.nodes < 1 or spec.gpus_per_node < 1:
        raise FerDistError("--nodes and --gpus-per-node must be at least 1")
    values = {"--job-name": spec.job_name, "--nodes": str(spec.nodes), "--partition": spec.partition,
              "--time": spec.time_limit, "--cpus-per-task": spec.cpus_per_task and str(spec.cpus_per_task),
              "--gpus-per-node": None if spec.cpu else str(spec.gpus_per_node), "--output": spec.output}
    out = []
    for line in script_for(spec).read_text().splitlines():
        key = line.removeprefix("#SBATCH ").split("=", 1)[0] if line.startswith("#SBATCH --") else None
        if key in values:
            if key == "--gpus-per-node" and spec.cpu:
                continue  # no GPU request for a CPU job
            if values[key] is not None:
                line = f"#SBATCH {key}={values[key]}"
            values.pop(key)
        name, sep, _ = line.partition("PROCS_PER_NODE=${PROCS_PER_NODE:-")
        if sep and name in ("", "export ") and spec.cpu:
            line = f"{name}PROCS_PER_NODE=${{PROCS_PER_NODE:-{spec.gpus_per_node}}}"
        if "(#SBATCH below: " in line:  # the header's note of the GPU request: the rendered value
            head, _, _ = line.partition("(#SBATCH below: ")
            line = f"{head}(#SBATCH below: {'none, CPU ranks' if spec.cpu else spec.gpus_per_node})"
        if line.strip() == "# fer-dist: training arguments":
            line = f"[ $# -gt 0 ] || set -- {shlex.join(spec.train_args)}"
        out.append(this_python(line))
    extra = [f"#SBATCH {k}={v}" for k, v in values.items() if v is not None]
    if extra:  # options the template does not carry go right after its last #SBATCH line
        last = max(i for i, line in enumerate(out) if line.startswith("#SBATCH"))
        out[last + 1:last + 1] = extra
    return "\n".join(out) + "\n"


def submit(script: str, directory: Path) -> str:
    """Write the rendered script into `directory` and submit it with sbatch; returns the job id."""
    if directory.exists() and not directory.is_dir():
        raise FerDistError(f"--script-dir {directory}: is a file, not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    tmp = directory / f".tmp-fer-dist-{stamp}-{os.getpid()}.sbatch"
    write_text_atomic(tmp, script)
    try:
        for n in range(1000):  # a new name each time: never replaces an earlier script (or anyone's file)
            path = directory / f"fer-dist-{stamp}{f'-{n}' if n else ''}.sbatch"
            try:
                os.link(tmp, path)  # complete, and only where nothing is
                break
            except FileExistsError:
                continue
        else:
            raise FerDistError(f"{directory}: 1000 scripts named fer-dist-{stamp}-N.sbatch exist already")
    finally:
        tmp.unlink(missing_ok=True)
    try:
        result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise FerDistError("sbatch: not found (run this on a SLURM login node)") from None
    if result.returncode != 0:
        raise FerDistError(f"sbatch {path}: {result.stderr.strip() or f'exit code {result.returncode}'}")
    return result.stdout.strip().split(";")[0]


if __name__ == "__main__":
    raise SystemExit(main())
