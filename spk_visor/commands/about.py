"""`spk-visor help [COMMAND...]`, `spk-visor about` and `spk-visor version`."""

from __future__ import annotations

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


def register(app: typer.Typer) -> None:
    @app.command()
    def version() -> None:
        """Print the version."""
        print(f"spk-visor {VERSION}")

    @app.command()
    def about() -> None:
        """What SmechVisor and spk-visor are."""
        print(
            f"spk-visor {VERSION}: the management toolkit of SmechVisor, a sealed,\n"
            "install-only bare-metal hypervisor OS (OpenRC, cloud-hypervisor v42 on\n"
            "/dev/kvm, GRUB with the IOMMU on). Nodes run smechvisord (REST API and\n"
            "dashboard on port 8080); this CLI talks to it locally, over HTTP(S) or SSH.\n"
            "The system is updated only with signed bundles: see `spk-visor ota`.\n"
            "Commands: spk-visor help; the manual: man spk-visor."
        )

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
