"""`fer-dist train`: check the config, the overrides and the data in one process, then launch the training."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from fer_dist.cli.plainhelp import PlainHelpCommand

Config = Annotated[Path | None, typer.Option(
    show_default=False, help="Training config YAML; default: the synthetic quick start.")]
Processes = Annotated[int | None, typer.Option(
    show_default=False,
    help="Processes on this machine (1 or more); default: run.num_processes, else one per GPU, else 1.")]
AccelerateConfig = Annotated[Path | None, typer.Option(
    show_default=False, help="An Accelerate launch config (launch_configs/accelerate/*.yaml) instead.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Check everything, then print the launch command.")]
Overrides = Annotated[list[str] | None, typer.Argument(
    show_default=False, help="key=value config overrides, e.g. method.tau=0.8 (`tau=0.8` where unique).")]


class KeysHelpCommand(PlainHelpCommand):
    """Its --help ends with every config key; the listing needs the config's module, loaded for help only."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from fer_dist.config import keys_help

        self.epilog = ("Example: fer-dist train --config launch_configs/train/fer2013_mobilenet_cpu.yaml "
                       "--processes 2 method.tau=0.8\n\n" + keys_help())
        super().format_help(ctx, formatter)


def train(
    config: Config = None,
    processes: Processes = None,
    accelerate_config: AccelerateConfig = None,
    dry_run: DryRun = False,
    overrides: Overrides = None,
) -> None:
    """Train: check everything here (one line and exit code 2 on bad input, nothing written), then run
    `accelerate launch -m fer_dist.train` with the same arguments (through `python -m fer_dist.launch`:
    stop signals checkpoint the run, errors are one line)."""
    from fer_dist import launch, prechecks
    from fer_dist.launchenv import CHECKED_ENV

    overrides = overrides or []
    prechecks.check_processes(processes, accelerate_config)
    # the label pass made here is the ranks' too (the launcher removes its file at the end)
    checked_tmp = None if dry_run else launch.checked_file()
    try:
        cfg = prechecks.check_training(config, overrides, dry_run=dry_run, checked_to=checked_tmp)
        launch_args = launch.launcher_args(cfg, processes, accelerate_config)
    except BaseException:
        if checked_tmp is not None:
            checked_tmp.unlink(missing_ok=True)
        raise
    train_args = (["--config", str(config)] if config is not None else []) + overrides
    command = launch.train_command(launch_args, train_args)
    if dry_run:
        typer.echo(shlex.join(command))
        return
    # the launcher takes this process's place: signals reach it directly
    os.execve(command[0], command, {**os.environ, CHECKED_ENV: str(checked_tmp)})


def register(app: typer.Typer) -> None:
    app.command(cls=KeysHelpCommand, rich_help_panel=None)(train)
