"""`spk-visor help [COMMAND...]`, `spk-visor about` and `spk-visor version`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from typer import _click
from typer.core import TyperGroup

from smechvisord.version import VERSION
from spk_visor.errors import UsageError


def help_text(ctx: _click.Context, words: list[str]) -> str:
    """The --help text of the command that `words` name below ctx's root
    (`["ota", "pull"]`: `spk-visor ota pull --help`)."""
    current = ctx.find_root()
    command = current.command
    path: list[str] = []
    for word in words:
        if not isinstance(command, TyperGroup) or not command.list_commands(current):
            raise UsageError(
                f"`spk-visor {' '.join(path)}` has no subcommands; {word!r} is not one",
                f"see: spk-visor help {' '.join(path)}",
            )
        sub = command.get_command(current, word)
        if sub is None or sub.hidden:
            known = [n for n in command.list_commands(current) if n != "help"]
            where = f"`spk-visor {' '.join(path)}`" if path else "spk-visor"
            raise UsageError(
                f"{where} has no command {word!r}", f"its commands: {', '.join(known)}"
            )
        path.append(word)
        # resilient_parsing: build the context --help would see, without running anything
        # or insisting on the command's required arguments.
        current = sub.make_context(word, [], parent=current, resilient_parsing=True)
        command = sub
    return command.get_help(current)


ABOUT = (
    "the management toolkit of SmechVisor, a sealed,\n"
    "install-only bare-metal hypervisor OS (OpenRC, cloud-hypervisor v42 on\n"
    "/dev/kvm, GRUB with the IOMMU on). Nodes run smechvisord (REST API and\n"
    "dashboard on port 8080); this CLI talks to it locally, over HTTP(S) or SSH.\n"
    "The system is updated only with signed bundles: see `spk-visor ota`.\n"
    "Commands: spk-visor help; the manual: man spk-visor."
)


def print_version(as_json: bool) -> None:
    # --json promises a JSON document for every output, this one included.
    print(json.dumps({"version": VERSION}) if as_json else f"spk-visor {VERSION}")


def _wants_json(ctx: typer.Context, own: bool) -> bool:
    """The command's own --json, or the global one (the state may hold either)."""
    return own or bool(getattr(ctx.obj, "json", False))


JsonFlag = Annotated[
    bool, typer.Option("--json", help="Machine-readable output (same as the global --json).")
]


def register(app: typer.Typer) -> None:
    @app.command()
    def version(ctx: typer.Context, as_json: JsonFlag = False) -> None:
        """Print the version."""
        print_version(_wants_json(ctx, as_json))

    @app.command()
    def about(ctx: typer.Context, as_json: JsonFlag = False) -> None:
        """What SmechVisor and spk-visor are."""
        if _wants_json(ctx, as_json):
            print(json.dumps({"version": VERSION, "about": ABOUT.replace("\n", " ")}))
        else:
            print(f"spk-visor {VERSION}: {ABOUT}")

    @app.command("help")
    def help_(
        ctx: typer.Context,
        command: Annotated[
            list[str] | None,
            typer.Argument(
                metavar="COMMAND",
                help="The command to explain, as you would type it: `ota pull`.",
                show_default=False,
            ),
        ] = None,
    ) -> None:
        """Show the help of spk-visor, or of a command: `spk-visor help ota pull`."""
        print(help_text(ctx, command or []))
