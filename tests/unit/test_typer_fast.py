"""spk_visor.typer_fast coerces exactly as Typer does: the same value for every value it
settles itself, the same error for every other one (it hands those to Typer)."""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import pytest
import typer
import typer._coercion
import typer.main
from typer import _click
from typer._coercion import build_runtime_param
from typer.core import TyperArgument, TyperGroup, TyperOption

from spk_visor import cli, typer_fast

demo = typer.Typer()


@demo.command()
def sample(
    name: Annotated[str, typer.Argument()],
    label: Annotated[str | None, typer.Option()] = None,
    count: Annotated[int, typer.Option()] = 3,
    cpus: Annotated[int, typer.Option(min=1, max=8)] = 1,
    ratio: Annotated[float, typer.Option()] = 0.5,
    timeout: Annotated[float | None, typer.Option(min=0.1)] = None,
    level: Annotated[int, typer.Option(min=0, max=3, clamp=True)] = 0,
    yes: Annotated[bool, typer.Option("--yes")] = False,
) -> None:
    """A parameter of each kind typer_fast handles."""


@demo.command()
def other() -> None:
    """A second command, so that `demo` is a group."""


SAMPLES: dict[Any, list[Any]] = {
    str: ["abc", "", " spaced ", "-1", b"bytes", None],
    int: ["0", "5", "-3", "+4", "007", "1e3", " 5", "5.0", "x", "", "99", 5, 9, True, 2.0, None],
    float: ["10", "0.5", "-1", "1e3", "inf", "nan", "1_000", ".5", "abc", "0.05", 30, 2.5, None],
    bool: [True, False, "true", "0", "", None],
}


def params(command: _click.Command, parent: _click.Context | None = None) -> list[Any]:
    ctx = command.context_class(
        command, parent=parent, info_name=command.name, **command.context_settings
    )
    found: list[Any] = [
        (p, ctx)
        for p in command.get_params(ctx)
        if isinstance(p, (TyperOption, TyperArgument))
        and isinstance(p._runtime_param, typer_fast.ScalarParam)
    ]
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            found += params(sub, ctx)
    return found


def outcome(runtime: Any, value: Any, param: Any, ctx: _click.Context) -> tuple[str, Any]:
    try:
        result = runtime.coerce(value, param=param, ctx=ctx)
    except _click.exceptions.BadParameter as e:
        return "error", e.format_message()
    return "value", (type(result), result)


def same_as_typer(command: _click.Command) -> int:
    typer_fast.install(command)
    checked = 0
    for param, ctx in params(command):
        kind = param.type_descriptor.annotation
        for value in SAMPLES[kind]:
            fast = outcome(param._runtime_param, value, param, ctx)
            slow = outcome(build_runtime_param(param.type_descriptor), value, param, ctx)
            if fast[0] == slow[0] == "value" and fast[1][1] != fast[1][1]:  # nan
                continue
            assert fast == slow, (param.name, value)
            checked += 1
    return checked


def test_every_kind_of_parameter_coerces_as_typer_does() -> None:
    assert same_as_typer(typer.main.get_command(demo)) > 50


def test_the_apps_own_parameters_coerce_as_typer_does() -> None:
    assert same_as_typer(cli.build(complete=True)) > 0


def test_the_help_option_and_global_options_are_covered() -> None:
    command = cli.build(complete=True)
    typer_fast.install(command)
    names = {p.name for p, _ in params(command)}
    assert {"node", "token", "timeout", "json", "help", "install_completion"} <= names


def test_a_bad_value_still_gets_typers_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--timeout", "soon", "node"]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--timeout'" in err, err


def test_typer_private_names_gone_means_typers_own_handling(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Typer release that renames a private name typer_fast uses must not make every
    command fail (cron's `ota pull` included): the CLI runs on with Typer's own coercion."""
    monkeypatch.delattr(typer._coercion, "build_runtime_param")  # a rename upstream
    broken = importlib.reload(typer_fast)
    try:
        command = typer.main.get_command(demo)
        broken.install(command)  # no error: nothing installed
        assert params(command) == []
        assert cli.main(["--timeout", "soon", "node"]) == 2
        assert "Invalid value for '--timeout'" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        importlib.reload(typer_fast)


def test_a_changed_parameter_object_means_typers_own_handling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Private attributes that moved (here: no `_runtime_param`) leave the command as
    Typer made it instead of raising."""
    command = typer.main.get_command(demo)
    monkeypatch.delattr(TyperOption, "_runtime_param", raising=False)
    sample_params = command.commands["sample"].params  # type: ignore[attr-defined]
    for param in sample_params:
        param.__dict__.pop("_runtime_param", None)
    typer_fast.install(command)
    assert not any(
        isinstance(p.__dict__.get("_runtime_param"), typer_fast.ScalarParam) for p in sample_params
    )
