"""`fer-dist experiment submit`: an experiment's (arm, seed) tasks as SLURM job arrays (tools/slurm/
experiment.sbatch), each task one `fer-dist experiment run --seeds S --arms A`.

With `shared_warmup`, each seed's warm-up is a job of its own and the arms of that seed an array that waits
for it (`--dependency=afterok:<warm-up job>`); without, one array holds every (arm, seed). Nothing here runs
training: shards must exist (they are made once, not by tasks racing each other), and the pinned `code:`
checkout is made at submission, before any task starts.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from fer_dist import slurm
from fer_dist.errors import FerDistError
from fer_dist.experiments.spec import Experiment

SCRIPT = slurm.SCRIPTS / "experiment.sbatch"


@dataclass
class Job:
    """One sbatch submission: a job array of runner argument lists, perhaps after another job."""

    name: str
    tasks: list[list[str]]
    after: int | None = None  # index (in the plan) of the job this one waits for (afterok)


@dataclass
class Resources:
    """The cluster's resources for one task; None: the script's default (or the cluster's)."""

    partition: str | None = None
    time_limit: str | None = None
    cpus_per_task: int | None = None
    gpus_per_node: int | None = None
    output: str | None = None  # the task's log; None: %x-%A_%a.out in the submit directory


def plan(exp: Experiment, seeds: list[int], arms: list[str], runs_dir: Path, results_dir: Path,
         extra: list[str]) -> list[Job]:
    """The jobs of an experiment, in the order they are submitted."""
    common = [str(exp.path), "--runs-dir", str(runs_dir), "--results-dir", str(results_dir),
              *(f"--set={e}" for e in extra)]
    if not exp.shared_warmup:
        return [Job(exp.name, [[*common, "--seeds", str(s), "--arms", a] for s in seeds for a in arms])]
    jobs: list[Job] = []
    for seed in seeds:
        jobs.append(Job(f"{exp.name}-warmup-s{seed}", [[*common, "--seeds", str(seed), "--warmup-only"]]))
        jobs.append(Job(f"{exp.name}-s{seed}", [[*common, "--seeds", str(seed), "--arms", a] for a in arms],
                        after=len(jobs) - 1))
    return jobs


def render(job: Job, res: Resources, dependency: str | None = None) -> str:
    """experiment.sbatch with the job's #SBATCH values and its tasks filled in."""
    values = {"--job-name": job.name, "--array": f"0-{len(job.tasks) - 1}", "--partition": res.partition,
              "--time": res.time_limit, "--cpus-per-task": res.cpus_per_task and str(res.cpus_per_task),
              "--gpus-per-node": res.gpus_per_node and str(res.gpus_per_node), "--output": res.output,
              "--dependency": dependency}
    out = []
    for line in SCRIPT.read_text().splitlines():
        key = line.removeprefix("#SBATCH ").split("=", 1)[0] if line.startswith("#SBATCH --") else None
        if key in values:
            if values[key] is not None:
                line = f"#SBATCH {key}={values[key]}"
            values.pop(key)
        if line.strip() == "# fer-dist: experiment tasks":
            line = "TASKS=(\n" + "".join(f"  {shlex.quote(shlex.join(t))}\n" for t in job.tasks) + ")"
        out.append(slurm.this_python(line))
    extra = [f"#SBATCH {k}={v}" for k, v in values.items() if v is not None]
    last = max(i for i, line in enumerate(out) if line.startswith("#SBATCH"))
    out[last + 1:last + 1] = extra  # options the template does not carry go after its last #SBATCH line
    return "\n".join(out) + "\n"


def missing_shards(exp: Experiment) -> list[str]:
    """The experiment's shard folders that do not exist yet."""
    return [spec["out"] for spec in exp.shards if not (Path(spec["out"]) / "manifest.json").exists()]


def submit_all(jobs: list[Job], res: Resources, script_dir: Path, *, dry_run: bool) -> list[tuple[str, str]]:
    """Render each job (its dependency filled with the job id it waits for) and submit it in order;
    returns (job name, job id or 'dry-run') and prints each script first."""
    ids: list[str] = []
    for job in jobs:
        wait = None if job.after is None else (
            f"afterok:{ids[job.after]}" if not dry_run else f"afterok:<job id of {jobs[job.after].name}>")
        script = render(job, res, wait)
        print(script, end="", flush=True)
        ids.append("dry-run" if dry_run else slurm.submit(script, script_dir))
        if not dry_run:
            print(f"submitted {job.name}: job {ids[-1]} ({len(job.tasks)} task{'s' * (len(job.tasks) > 1)})"
                  + (f", after job {ids[job.after]}" if job.after is not None else ""), flush=True)
    return [(job.name, i) for job, i in zip(jobs, ids, strict=True)]


def check_ready(exp: Experiment) -> None:
    """Refuse a submission whose tasks would race to make the shards: they are made once, first."""
    missing = missing_shards(exp)
    if missing:
        from fer_dist.experiments.run import shard_commands

        # each command is [python, -m, fer_dist.cli, shard, ...]: shown as the user types it
        cmds = "; ".join("fer-dist " + shlex.join(c[3:]) for c in shard_commands(exp))
        raise FerDistError(f"{exp.path}: shards: {', '.join(missing)} missing; make them first: {cmds}")
