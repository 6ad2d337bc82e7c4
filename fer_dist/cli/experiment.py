"""`fer-dist experiment run | report | submit`: an experiment's arms x seeds trained, tested and recorded to
docs/results/, the results page written from those records, or the same tasks as SLURM job arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ExperimentFile = Annotated[Path, typer.Argument(
    show_default=False, help="An experiment definition, launch_configs/experiments/*.yaml.")]
Seeds = Annotated[str | None, typer.Option(show_default=False,
                                           help="Seeds, comma-separated (default: the file's).")]
Arms = Annotated[str | None, typer.Option(show_default=False,
                                          help="Arms, comma-separated (default: all, in the file's order).")]
RunsDir = Annotated[Path, typer.Option(help="Where the runs live (<runs-dir>/<experiment>/<arm>-s<seed>).")]
ResultsDir = Annotated[Path, typer.Option(help="Where the records live (<results-dir>/<experiment>.json).")]
Sets = Annotated[list[str] | None, typer.Option(
    "--set", show_default=False, help="key=value: a training override for every arm (after the file's own).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print what would run; run or submit nothing.")]

experiment_app = typer.Typer(no_args_is_help=True,
                             help="Experiments: arms x seeds trained, tested, recorded and reported.")


def _ints(text: str | None, what: str) -> list[int] | None:
    from fer_dist.errors import FerDistError

    try:
        return [int(s) for s in text.split(",")] if text else None
    except ValueError:
        raise FerDistError(f"{what}: expected integers separated by commas (got {text!r})") from None


@experiment_app.command(epilog=(
    "Example: fer-dist experiment run launch_configs/experiments/fer2013_scarce.yaml --seeds 0,1 "
    "--arms supervised,method"))
def run(experiment: ExperimentFile, seeds: Seeds = None, arms: Arms = None,
        runs_dir: RunsDir = Path("runs/experiments"), results_dir: ResultsDir = Path("docs/results"),
        set_: Sets = None, warmup_only: Annotated[bool, typer.Option(
            "--warmup-only", help="Train only the seeds' shared warm-ups (what submit's warm-up jobs run).")
        ] = False, dry_run: DryRun = False) -> None:
    """Train, test and record each (seed, arm) not recorded yet; rerun the same command to continue.

    Exit codes: 0 done, 2 bad input (one line naming the file and field), 1 a training that failed, 3
    stopped by a signal (the training checkpointed; rerun to resume)."""
    from fer_dist.experiments.run import Stopped, run_experiment, selection
    from fer_dist.experiments.spec import read_experiment

    extra = set_ or []
    exp = read_experiment(experiment)
    chosen_seeds, chosen_arms = selection(exp, _ints(seeds, "--seeds"), arms and arms.split(","), extra)
    try:
        code = run_experiment(exp, seeds=chosen_seeds, arms=chosen_arms, runs_dir=runs_dir,
                              results=results_dir / f"{exp.name}.json", extra=extra, dry_run=dry_run,
                              warmup_only=warmup_only)
    except Stopped as e:
        typer.echo(f"stopped: {e}", err=True)
        raise typer.Exit(3) from None
    raise typer.Exit(code)


@experiment_app.command(epilog=(
    "Example: fer-dist experiment report"))
def report(experiments: Annotated[Path, typer.Option(help="The experiment definitions' folder.")] = Path(
               "launch_configs/experiments"),
           results_dir: ResultsDir = Path("docs/results"),
           out: Annotated[Path, typer.Option(help="The results page.")] = Path("docs/RESULTS.md"),
           readme: Annotated[str, typer.Option(
               help="The file whose results block is rewritten ('' for none).")] = "README.md",
           img_dir: Annotated[Path, typer.Option(help="Where the pictures go.")] = Path("docs/img")) -> None:
    """Write the results page, its pictures and the README's results block from the records."""
    from fer_dist.experiments.publish import publish

    for line in publish(experiments, results_dir, out, Path(readme) if readme else None, img_dir):
        typer.echo(f"wrote {line}")


@experiment_app.command(epilog=(
    "Example: fer-dist experiment submit launch_configs/experiments/fer2013_scarce.yaml --partition cpu "
    "--time 12:00:00"))
def submit(experiment: ExperimentFile, seeds: Seeds = None, arms: Arms = None,
           runs_dir: RunsDir = Path("runs/experiments"), results_dir: ResultsDir = Path("docs/results"),
           set_: Sets = None,
           partition: Annotated[str | None, typer.Option(show_default=False, help="Partition.")] = None,
           time_limit: Annotated[str | None, typer.Option(
               "--time", show_default=False, help="Time limit of one task (default: the script's 24:00:00).")
           ] = None,
           cpus_per_task: Annotated[int | None, typer.Option(show_default=False, help="Cores per task.")
                                    ] = None,
           gpus_per_node: Annotated[int | None, typer.Option(show_default=False, help="GPUs per task.")
                                    ] = None,
           output: Annotated[str | None, typer.Option(
               show_default=False, help="Each task's log (sbatch --output); default: %x-%A_%a.out.")] = None,
           script_dir: Annotated[Path, typer.Option(help="Where the rendered scripts are written.")] = Path(
               "runs/slurm"),
           dry_run: DryRun = False) -> None:
    """Submit the experiment as SLURM job arrays: one task per (arm, seed); with shared warm-ups, each
    seed's warm-up a job its arms wait for (afterok). Records are appended under a file lock."""
    import shutil

    from fer_dist.errors import FerDistError
    from fer_dist.experiments import submit as jobs
    from fer_dist.experiments.run import code_checkout, selection
    from fer_dist.experiments.spec import read_experiment

    if not dry_run and shutil.which("sbatch") is None:
        raise FerDistError("sbatch: not found (run this on a SLURM login node; --dry-run shows the scripts)")
    extra = set_ or []
    exp = read_experiment(experiment)
    chosen_seeds, chosen_arms = selection(exp, _ints(seeds, "--seeds"), arms and arms.split(","), extra)
    if not dry_run:
        jobs.check_ready(exp)
        code_checkout(exp, runs_dir)  # once, here: tasks starting together must not race to make it
    plan = jobs.plan(exp, chosen_seeds, chosen_arms, runs_dir, results_dir, extra)
    res = jobs.Resources(partition=partition, time_limit=time_limit, cpus_per_task=cpus_per_task,
                         gpus_per_node=gpus_per_node, output=output)
    jobs.submit_all(plan, res, script_dir, dry_run=dry_run)


def register(app: typer.Typer) -> None:
    app.add_typer(experiment_app, name="experiment")
