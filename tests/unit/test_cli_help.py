"""Every option's help, as `--help` prints it, says its default once (issue 10, #14:
`deploy receive --help` printed `[default: reboot]` twice, once written into the help text
and once added by Typer)."""

from __future__ import annotations

from collections.abc import Iterator

import typer.main
from typer import _click
from typer.core import TyperGroup

from spk_visor import cli


def _commands(
    command: _click.Command, ctx: _click.Context
) -> Iterator[tuple[_click.Command, _click.Context]]:
    yield command, ctx
    if isinstance(command, TyperGroup):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None:
                yield from _commands(sub, _click.Context(sub, info_name=name, parent=ctx))


def test_no_option_states_its_default_twice() -> None:
    root = typer.main.get_command(cli.app)
    twice = []
    seen = 0
    for command, ctx in _commands(root, _click.Context(root, info_name="spk-visor")):
        for param in command.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            seen += 1
            if record[1].count("default:") + record[1].count("default ") > 1:
                twice.append(f"{ctx.command_path} {record[0]}: {record[1]}")
    assert seen > 50, "the walk found too few options to mean anything"
    assert not twice, "\n".join(twice)


def test_help_names_values_not_python_types() -> None:
    """--help showed `<path>`, `<int range>`, `<list[str]>` and `{BUNDLE}` where a value
    had no explicit metavar: each value is named for what to type (FILE, N, CODE...)."""
    import re  # noqa: PLC0415

    from tests.support import cli as run_cli  # noqa: PLC0415

    for argv in (["ota", "push"], ["ota", "build"], ["deploy", "send"], ["vm", "console"]):
        res = run_cli.run(*argv, "--help", env={"COLUMNS": "200"})
        assert res.code == 0, res
        raw = re.findall(r"<[a-z][^>]*>|\{[A-Z_.]+\}", res.out)
        assert not raw, (argv, raw, res.out)


def test_the_help_of_single_commands_keeps_what_their_docstring_says() -> None:
    # For iommu, pci and reboot-uefi the group's one-line help replaced the command's own
    # text: `iommu --help` did not say it exits 3 when not ready, nor `reboot-uefi --help`
    # that running VMs are shut down first.
    from tests.support.cli import run  # noqa: PLC0415

    wanted = {
        "iommu": "exit 0 when ready for passthrough, 3 when not",
        "pci": "--fleet: a summary row per node",
        "reboot-uefi": "running VMs are shut down gracefully first",
    }
    for command, text in wanted.items():
        r = run(command, "--help")
        assert r.code == 0, r
        assert text in " ".join(r.out.split()), r.out
