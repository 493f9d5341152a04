"""Number options refuse nan, inf and an empty value, with a line saying what to give.

Typer (pydantic) takes "nan" and "inf" as floats: `ota pull --jitter inf` was a sleep
without end and `ota publish --rollout nan` "should be less than or equal to 100"; an
empty value got pydantic's words. `install` puts this check in front of every int or
float parameter's own processing (click's public `process_value`), so it holds whichever
coercion runs after it: typer_fast's or, when that stands aside, Typer's own.
"""

from __future__ import annotations

import math
from typing import Any, get_args, get_origin

from typer import _click
from typer._click.exceptions import BadParameter
from typer.core import TyperArgument, TyperGroup, TyperOption


def number_problem(kind: Any, value: Any, low: float | None, high: float | None) -> str | None:
    """What is wrong with `value` given for an int or float parameter (bounds `low`,
    `high`): nan, inf or nothing; None for anything else, which Typer judges."""
    if kind not in (int, float) or type(value) is not str:
        return None
    text = value.strip()
    if not text:
        what = "an empty value is not a number"
    else:
        try:
            number = float(text)
        except ValueError:
            return None
        if math.isfinite(number):
            return None
        what = f"{value!r} is not a {'whole' if kind is int else 'finite'} number"
    whole = "whole " if kind is int else ""
    if low is not None and high is not None:
        give = f"a {whole}number from {low:g} to {high:g}"
    elif low is not None:
        give = f"a {whole}number of at least {low:g}"
    elif high is not None:
        give = f"a {whole}number of at most {high:g}"
    else:
        give = f"a {whole}number such as {'3' if kind is int else '2.5'}"
    return f"{what}; give {give}"


def _number_kind(param: Any) -> tuple[Any, Any] | None:
    """(int or float, the parameter's info) for a number parameter or a list of them."""
    desc = param.type_descriptor
    kind = desc.annotation
    if get_origin(kind) is list and len(get_args(kind)) == 1:
        kind = get_args(kind)[0]
    if kind not in (int, float) or desc.is_choice:
        return None
    return kind, desc.parameter_info


def _guard(param: TyperOption | TyperArgument, kind: Any, info: Any) -> None:
    process = param.process_value

    def process_value(ctx: _click.Context, value: Any) -> Any:
        for item in value if isinstance(value, (list, tuple)) else (value,):
            why = number_problem(kind, item, info.min, info.max)
            if why is not None:
                raise BadParameter(why, ctx=ctx, param=param)
        return process(ctx, value)

    # An instance attribute: this parameter only, Typer's classes stay as they are.
    param.process_value = process_value  # type: ignore[method-assign]


def install(command: _click.Command) -> None:
    """Guard the number parameters of `command` and its loaded subcommands (once each)."""
    for param in command.params:
        if isinstance(param, (TyperOption, TyperArgument)) and "process_value" not in vars(param):
            found = _number_kind(param)
            if found is not None:
                _guard(param, *found)
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            install(sub)
