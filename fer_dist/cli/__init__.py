"""The `fer-dist` command line: one Typer app; each command group's module registers its commands.

A FerDistError raised by any command, and a usage error (a missing or unknown option, a bad value),
becomes `error: <message>` on one line of stderr and exit code 2; Ctrl-C exits with 130 (Typer's own
handling); anything else keeps its traceback. The handling sits in the app's root group, so `CliRunner`
tests see what users see. Command modules import torch and the like inside their commands, so that
`--help` and these errors answer at once.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer

from fer_dist.cli.plainhelp import PlainHelpGroup, use_plain_help
from fer_dist.errors import FerDistError

# Each module has `register(app)`; a new command group adds its module here.
COMMAND_MODULES: tuple[str, ...] = ("fer_dist.cli.shard", "fer_dist.cli.train", "fer_dist.cli.slurm",
                                    "fer_dist.cli.evaluate", "fer_dist.cli.cv", "fer_dist.cli.experiment")


class _RootGroup(PlainHelpGroup):
    """The app's root command group: turns FerDistError into one line and exit code 2."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FerDistError as exc:
            message = " ".join(str(exc).split())  # one line even if a message slipped a newline in
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None
        except typer.TyperException as exc:  # Click's usage errors (exit code 2): one line, not a panel
            if getattr(exc, "exit_code", 1) != 2 or type(exc).__name__ == "NoArgsIsHelpError":
                raise
            where = getattr(getattr(exc, "ctx", None), "command_path", "fer-dist")
            message = " ".join(exc.format_message().split())
            typer.echo(f"error: {message} (see `{where} --help`)", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_RootGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals of a data pipeline are arrays: unreadable, and slow
    help="Weakly supervised facial expression recognition: shard data sets, train, evaluate.",
)
for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)
use_plain_help(app)


def main() -> None:
    """Entry point of the `fer-dist` console script."""
    app(prog_name="fer-dist")
