"""Keep pydantic off the CLI's start-up path.

Typer 0.29 coerces every parameter through a pydantic TypeAdapter, built on the first
value it sees, even None (only a flag's True or False skips it). So every run of
`spk-visor --node URL node` imported pydantic and built adapters for the global options:
~0.2 s of the 0.3 s the issue allows (bench/cli.py shows it with `python -X importtime`).

`install` gives each plain str, int, float or bool parameter a coercion that settles the
values needing no validation (None, a str for a str, a plain decimal within the
parameter's bounds, a bool for a bool) with the standard library, and hands any other
value to Typer's own coercion, so a bad value still gets exactly Typer's error message.
The same goes for a Path parameter without constraints (a path Typer would accept as it
is) and for a list of either (`deploy send CODE... --target ... --disk ...`: each item
as above, the whole list to Typer if any item needs it).

A number option given nan, inf or nothing gets a message of its own from number_options,
which is in place whether or not this module's coercion is.

This reaches into Typer's private parts (`_runtime_param`, `typer._coercion`). pyproject
pins the exact typer version, and tests/unit/test_typer_fast.py fails if they move; should
a different Typer be installed anyway, `install` does nothing (Typer's own handling, only
slower) rather than failing every command.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from typer import _click
from typer.core import TyperArgument, TyperGroup, TyperOption

try:
    from typer._coercion import RuntimeParam, build_runtime_param
except ImportError:  # another Typer: fall back to its own coercion (see install)
    RuntimeParam = object  # type: ignore[assignment,misc]
    build_runtime_param = None  # type: ignore[assignment]

# Conservative on purpose: pydantic accepts more (exponents, "inf", underscores, blanks)
# and anything outside these shapes goes to it, so the result never differs.
_INT = re.compile(r"[+-]?(?:0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"[+-]?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,15})?")
_UNHANDLED = object()


@dataclass(frozen=True)
class _Fast(RuntimeParam):
    """`_fast` settles a value or says _UNHANDLED: then Typer's own coercion judges it."""

    def _fast(self, value: Any) -> Any:
        return _UNHANDLED

    def _coerce_value(self, value: Any, param: Any, ctx: _click.Context) -> Any:
        result = self._fast(value)
        if result is _UNHANDLED:
            # Typer's own coercion (pydantic): only now is pydantic imported.
            return build_runtime_param(param.type_descriptor)._coerce_value(value, param, ctx)
        return result


@dataclass(frozen=True)
class ScalarParam(_Fast):
    """A str, int or float parameter: fast for plain values, Typer's path for the rest."""

    def _fast(self, value: Any) -> Any:
        kind = self.annotation
        info = self.parameter_info
        if kind is str:
            return value if type(value) is str else _UNHANDLED
        if kind is bool:
            return value if type(value) is bool else _UNHANDLED
        if type(value) is str:
            if not (_INT if kind is int else _FLOAT).fullmatch(value):
                return _UNHANDLED
            number: int | float = kind(value)
        elif type(value) is int or (type(value) is float and kind is float):
            number = kind(value)  # a default: 30 for a float option is 30.0, as pydantic says
        else:
            return _UNHANDLED
        if (info.min is not None and number < info.min) or (
            info.max is not None and number > info.max
        ):
            return _UNHANDLED  # Typer's message names the range (or clamps)
        return number


@dataclass(frozen=True)
class PathParam(_Fast):
    """A Path parameter with no constraints (no exists, resolve_path, allow_dash, file or
    dir only, writable, path_type): any path but one with a NUL byte is accepted as it
    is. Typer also refuses an existing path this process cannot read; that one, like
    anything else out of the ordinary, goes to Typer for its own message."""

    def _fast(self, value: Any) -> Any:
        if type(value) is not str or "\x00" in value:
            return _UNHANDLED
        path = Path(value)
        if self.parameter_info.readable and os.path.exists(path) and not os.access(path, os.R_OK):
            return _UNHANDLED
        return path


@dataclass(frozen=True)
class ListParam(_Fast):
    """A repeatable option or a variadic argument of one of the kinds above: a list of
    the items, each settled as a single one would be; any item that is not settles the
    whole list through Typer (the same list, or Typer's error)."""

    item: ScalarParam | PathParam

    def _fast(self, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            return _UNHANDLED
        items = [self.item._fast(v) for v in value]
        return _UNHANDLED if any(i is _UNHANDLED for i in items) else items


def _plain_path(annotation: Any, info: Any) -> bool:
    """A pathlib.Path whose values Typer checks for nothing but readability."""
    return (
        annotation is Path
        and info.path_type is None
        and info.file_okay
        and info.dir_okay
        and not (info.exists or info.writable or info.resolve_path or info.allow_dash)
    )


def _fast_param(param: TyperOption | TyperArgument) -> RuntimeParam | None:
    """The fast coercion for this parameter, or None: Typer's own."""
    desc = param.type_descriptor
    info = desc.parameter_info
    if desc.file_annotation is not None or info.parser is not None or desc.is_choice:
        return None
    kind: Any = desc.annotation
    many = param.multiple or param.nargs == -1
    if many:
        args = get_args(kind)
        if get_origin(kind) is not list or len(args) != 1:
            return None
        kind = args[0]
    elif param.nargs != 1:
        return None
    single: ScalarParam | PathParam
    if kind in (str, int, float, bool) and not desc.is_path:
        single = ScalarParam(parameter_info=info, annotation=kind)
    elif _plain_path(kind, info):
        single = PathParam(parameter_info=info, annotation=kind)
    else:
        return None
    if many:
        return ListParam(parameter_info=info, annotation=desc.annotation, item=single)
    return single


def install(command: _click.Command, parent: _click.Context | None = None) -> None:
    """Give every eligible parameter of `command` and its subcommands the fast coercion;
    nothing at all where Typer's private names are not what this module knows."""
    if build_runtime_param is None:
        return
    try:
        _install(command, parent)
    except (AttributeError, TypeError):
        # A Typer whose private parts moved: undo, so every parameter is Typer's own.
        _uninstall(command)


def _uninstall(command: _click.Command) -> None:
    for param in command.params:
        if isinstance(getattr(param, "_runtime_param", None), FAST):
            param._runtime_param = None  # type: ignore[attr-defined]
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            _uninstall(sub)


def _install(command: _click.Command, parent: _click.Context | None) -> None:
    # A context built as parsing would build it (names, inherited help option names), not
    # by parsing: -h/--help is created on demand from it and is a parameter like the others.
    ctx = command.context_class(
        command, parent=parent, info_name=command.name, **command.context_settings
    )
    for param in command.get_params(ctx):
        if isinstance(param, (TyperOption, TyperArgument)) and param._runtime_param is None:
            fast = _fast_param(param)
            if fast is not None:
                param._runtime_param = fast
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            _install(sub, ctx)


# The coercions `install` gives (a Typer parameter holding one of these is fast).
FAST = (ScalarParam, PathParam, ListParam)
