"""spk_visor.typer_fast coerces exactly as Typer does: the same value for every value it
settles itself, the same error for every other one (it hands those to Typer)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import pytest
import typer
import typer._coercion
import typer.main
from typer import _click
from typer._coercion import build_runtime_param
from typer.core import TyperArgument, TyperGroup, TyperOption

from spk_visor import cli, typer_fast
from spk_visor.number_options import number_problem

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
    bundle: Annotated[Path | None, typer.Option()] = None,
    out: Annotated[Path, typer.Option()] = Path("/mnt/target"),
    tag: Annotated[list[str], typer.Option()] = [],  # noqa: B006
    key: Annotated[list[Path], typer.Option()] = [],  # noqa: B006
    port: Annotated[list[int], typer.Option(min=1, max=65535)] = [],  # noqa: B006
) -> None:
    """A parameter of each kind typer_fast handles."""


@demo.command()
def variadic(codes: Annotated[list[str], typer.Argument()]) -> None:
    """A variadic argument (`deploy send CODE...`)."""


@demo.command()
def checked(
    root: Annotated[Path, typer.Option(exists=True)],
    dest: Annotated[Path, typer.Option(dir_okay=False, resolve_path=True)],
    dash: Annotated[Path, typer.Option(allow_dash=True)],
    roots: Annotated[list[Path], typer.Option(exists=True)],
) -> None:
    """Paths Typer checks: left to Typer."""


@demo.command()
def other() -> None:
    """A second command, so that `demo` is a group."""


SAMPLES: dict[Any, list[Any]] = {
    str: ["abc", "", " spaced ", "-1", b"bytes", None],
    int: ["0", "5", "-3", "+4", "007", "1e3", " 5", "5.0", "x", "", "99", 5, 9, True, 2.0, None],
    float: ["10", "0.5", "-1", "1e3", "inf", "nan", "1_000", ".5", "abc", "0.05", 30, 2.5, None],
    bool: [True, False, "true", "0", "", None],
    Path: ["bundle.spkb", "", "a//b/", " sp ", "-", "~/x", "a\x00b", "a\udcff", "/", None],
}
UNREADABLE = "unreadable.txt"  # made by the test, mode 000: Typer says "not readable"
SAMPLES[Path].append(UNREADABLE)
for _kind, _list in ((str, list[str]), (int, list[int]), (Path, list[Path])):
    _items = [v for v in SAMPLES[_kind] if v is not None]
    SAMPLES[_list] = [
        (),
        [],
        tuple(_items[:2]),
        *[(v,) for v in _items],
        tuple(_items),
        "one",  # not a sequence: Typer's error
        None,
    ]


def params(command: _click.Command, parent: _click.Context | None = None) -> list[Any]:
    ctx = command.context_class(
        command, parent=parent, info_name=command.name, **command.context_settings
    )
    found: list[Any] = [
        (p, ctx)
        for p in command.get_params(ctx)
        if isinstance(p, (TyperOption, TyperArgument))
        and isinstance(p._runtime_param, typer_fast.FAST)
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


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relative sample paths resolve in tmp_path, the unreadable file among them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / UNREADABLE).touch(mode=0)


def same_as_typer(command: _click.Command) -> int:
    typer_fast.install(command)
    checked = 0
    for param, ctx in params(command):
        kind = param.type_descriptor.annotation
        for value in SAMPLES[kind]:
            items = value if isinstance(value, (list, tuple)) else [value]
            info = param.type_descriptor.parameter_info
            item_kind = get_args(kind)[0] if get_origin(kind) is list else kind
            if any(number_problem(item_kind, v, info.min, info.max) for v in items):
                # nan, inf and an empty number never reach a coercion: number_options
                # refuses them first (test_cli_parsing.py::test_nan_inf_and_empty_numbers_...).
                continue
            fast = outcome(param._runtime_param, value, param, ctx)
            slow = outcome(build_runtime_param(param.type_descriptor), value, param, ctx)
            assert fast == slow, (param.name, value)
            checked += 1
    return checked


def test_every_kind_of_parameter_coerces_as_typer_does() -> None:
    assert same_as_typer(typer.main.get_command(demo)) > 120


def test_lists_and_paths_get_the_fast_coercion() -> None:
    """The kinds `deploy send` has (CODE..., --bundle, --target, --disk): pydantic only for
    the values Typer must judge."""
    command = typer.main.get_command(demo)
    typer_fast.install(command)
    kinds = {p.name: type(p._runtime_param).__name__ for p, _ in params(command)}
    assert kinds["bundle"] == kinds["out"] == "PathParam"
    assert kinds["tag"] == kinds["key"] == kinds["port"] == kinds["codes"] == "ListParam"


def test_paths_typer_checks_stay_typers() -> None:
    command = typer.main.get_command(demo)
    typer_fast.install(command)
    names = {p.name for p, _ in params(command)}
    assert names.isdisjoint({"root", "dest", "dash", "roots"})


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
        # The number check does not ride on typer_fast: nan and inf are still refused
        # (`--jitter inf` would be a sleep without end), before anything runs.
        for argv in (
            ["--timeout", "inf", "node"],
            ["ota", "pull", "--jitter", "inf"],
            ["ota", "publish", "--repo", "r", "--rollout", "nan", "b.spkb"],
        ):
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "is not a finite number; give a" in err, (argv, err)
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
