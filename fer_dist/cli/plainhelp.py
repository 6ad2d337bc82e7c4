"""`--help` without Python types: `PATH`, `INTEGER`, `TEXT...` where Typer would print `<path>`, `<int>`,
`<list[str]>`, and nothing after a flag (Typer prints `<bool>`, which reads as if the flag took a value)."""

from __future__ import annotations

import re
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

PLAIN = {"path": "PATH", "Path": "PATH", "int": "INTEGER", "str": "TEXT", "float": "NUMBER"}


def plain_type(param: Any, ctx: Any) -> str | None:
    """The word shown after a parameter in --help: None for a flag, else Click's classic upper-case name."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    if getattr(param, "metavar", None) and param.param_type_name == "option":
        return param.metavar
    label = type(param).display_type(param, ctx).strip("<>")
    inner = re.fullmatch(r"list\[(.*)\]", label)
    many = inner is not None or param.nargs != 1
    label = inner.group(1) if inner else label
    return PLAIN.get(label, label) + ("..." if many else "")


def _plain_params(command: Any, ctx: Any) -> None:
    # Typer's help renderer asks each parameter for `display_type_rich`; ours answers in plain words.
    for param in command.get_params(ctx):
        param.display_type_rich = lambda ctx=None, _p=param: plain_type(_p, ctx)


class PlainHelpCommand(TyperCommand):
    """A Typer command whose --help shows plain value names (see the module's docstring)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _plain_params(self, ctx)
        super().format_help(ctx, formatter)


class PlainHelpGroup(TyperGroup):
    """A Typer command group whose --help shows plain value names."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _plain_params(self, ctx)
        super().format_help(ctx, formatter)


def use_plain_help(app: typer.Typer) -> None:
    """Give every command of `app` (and of its sub-apps) plain --help value names."""
    for info in app.registered_commands:
        if not (isinstance(info.cls, type) and issubclass(info.cls, PlainHelpCommand)):
            info.cls = PlainHelpCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            for info in (group, group.typer_instance.info):  # unset, typer's Default(...) placeholder
                if not (isinstance(info.cls, type) and issubclass(info.cls, PlainHelpGroup)):
                    info.cls = PlainHelpGroup
            use_plain_help(group.typer_instance)
