"""Readable value names in --help: Typer shows a value without an explicit metavar by its
Python type (`--out <path>`, `--parallel <int range>`, `CODE... <list[str]>`) and a
required argument as `{BUNDLE}`. A user types a FILE or an N, not a type: every value
gets a name (an explicit metavar wins), and arguments show just that name."""

from __future__ import annotations

from typing import Any

from typer import _click
from typer.core import TyperArgument, TyperGroup, TyperOption


def _name_for(param: Any) -> str:
    desc = param.type_descriptor
    text = param.display_type(None) if not desc.is_choice else ""
    if desc.is_path or "path" in text.lower():
        return "PATH"
    if "int" in text:
        return "N"
    if "float" in text:
        return "NUMBER"
    # Text: what the option names (--channel CHANNEL) says more than TEXT would.
    return str(param.name or "text").upper()


def _argument_usage(param: TyperArgument) -> str:
    name = str(param.metavar)
    if param.nargs != 1 and not name.endswith("..."):
        name += "..."
    return name if param.required else f"[{name}]"


def _show_name_only(param: TyperArgument, usage: str) -> None:
    def no_type(ctx: _click.Context) -> str | None:
        return None

    def usage_pieces(ctx: _click.Context) -> list[str]:
        return [usage]

    # Instance attributes: this parameter only, Typer's classes stay as they are.
    param.display_type_rich = no_type  # type: ignore[method-assign]
    param.get_usage_pieces = usage_pieces  # type: ignore[method-assign]


def install(command: _click.Command) -> None:
    """Name the values of `command` and its loaded subcommands."""
    for param in command.params:
        if isinstance(param, TyperOption) and not param.is_flag and not param.count:
            if param.metavar is None and not param.type_descriptor.is_choice:
                param.metavar = _name_for(param)
        elif isinstance(param, TyperArgument):
            if param.metavar is None and param.name:
                param.metavar = param.name.upper()
            _show_name_only(param, _argument_usage(param))
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            install(sub)
