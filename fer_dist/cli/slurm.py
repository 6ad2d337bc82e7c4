"""`fer-dist slurm submit`: a `tools/slurm/` batch script rendered with a job's values, shown, submitted."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from fer_dist.errors import FerDistError

Config = Annotated[Path | None, typer.Option(
    show_default=False, help="Training config YAML; default: the synthetic quick start.")]
Nodes = Annotated[int, typer.Option(help="Nodes; one task each (2+: multi_node.sbatch, c10d rendezvous).")]
GpusPerNode = Annotated[int, typer.Option(help="GPUs per node, one rank each (--cpu: CPU ranks per node).")]
Partition = Annotated[str | None, typer.Option(show_default=False, help="Partition; default: the cluster's.")]
TimeLimit = Annotated[str | None, typer.Option(
    "--time", show_default=False, help="Time limit (e.g. 12:00:00); default: the script's 24:00:00.")]
CpusPerTask = Annotated[int | None, typer.Option(show_default=False, help="Cores per node's task.")]
JobName = Annotated[str, typer.Option(help="The job's name (its log: <name>-<job id>.out).")]
Cpu = Annotated[bool, typer.Option("--cpu", help="CPU-only ranks (gloo): no GPU request.")]
Output = Annotated[str | None, typer.Option(
    show_default=False, help="The job's log (sbatch --output, e.g. logs/%x-%j.out); default: %x-%j.out.")]
Script = Annotated[Path | None, typer.Option(
    show_default=False, help="Batch script template; default: tools/slurm/single_node or multi_node.sbatch.")]
ScriptDir = Annotated[Path, typer.Option(help="Where the rendered script is written before sbatch reads it.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the rendered script only; submit nothing.")]
Overrides = Annotated[list[str] | None, typer.Argument(
    show_default=False, help="key=value config overrides, e.g. method.tau=0.8.")]

slurm_app = typer.Typer(no_args_is_help=True, help="Run the training on a SLURM cluster.")


@slurm_app.command(epilog="Example: fer-dist slurm submit --config launch_configs/train/fer2013_vggface.yaml "
                   "--nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00")
def submit(
    config: Config = None,
    nodes: Nodes = 1,
    gpus_per_node: GpusPerNode = 1,
    partition: Partition = None,
    time_limit: TimeLimit = None,
    cpus_per_task: CpusPerTask = None,
    job_name: JobName = "fer-dist",
    cpu: Cpu = False,
    output: Output = None,
    script: Script = None,
    script_dir: ScriptDir = Path("runs/slurm"),
    dry_run: DryRun = False,
    overrides: Overrides = None,
) -> None:
    """Check the config and data here, render the batch script, show it and submit it with sbatch."""
    from fer_dist import prechecks, slurm

    if not dry_run and shutil.which("sbatch") is None:
        raise FerDistError("sbatch: not found (run this on a SLURM login node; --dry-run shows the script)")
    if nodes < 1 or gpus_per_node < 1:
        raise FerDistError("--nodes and --gpus-per-node must be at least 1")
    overrides = overrides or []
    cfg = prechecks.check_training(config, overrides, dry_run=dry_run)
    prechecks.check_world(cfg, nodes * gpus_per_node, cpu=cpu)
    train_args = (["--config", str(config)] if config is not None else []) + overrides
    spec = slurm.JobSpec(nodes=nodes, gpus_per_node=gpus_per_node, train_args=train_args, partition=partition,
                         time_limit=time_limit, job_name=job_name, cpus_per_task=cpus_per_task, cpu=cpu,
                         output=output, script=script)
    script = slurm.render(spec)
    typer.echo(script, nl=False)
    if dry_run:
        return
    job = slurm.submit(script, script_dir)
    log = (output or "%x-%j.out").replace("%x", job_name).replace("%j", job)
    typer.echo(f"submitted job {job}: watch it with `squeue -j {job}` and `tail -f {log}`")


def register(app: typer.Typer) -> None:
    app.add_typer(slurm_app, name="slurm")
