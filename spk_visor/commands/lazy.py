"""The root's command table, imported on demand: `spk-visor node` loads node.py and what it
uses, never ota.py, deploy.py or their libraries (tqdm, zstandard, cryptography, ...).

Each entry names a module and a function that attaches the command(s) to a Typer app, the
way cli.py did it eagerly. Only the command that runs is imported; `--help`, `help` and the
man page generator ask for every name and so import every module, which is fine there.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import typer
import typer.main
from typer import _click
from typer.core import TyperCommand, TyperGroup

from spk_visor import help_names, number_options, typer_fast


class Lazy(NamedTuple):
    """`name` comes from `module`: either its `app` (a group) or, with `register`, the
    command that its register function adds to an app under that name."""

    module: str
    register: str | None = None

    def attach(self, name: str, app: typer.Typer) -> None:
        mod = importlib.import_module(self.module)
        if self.register is None:
            app.add_typer(mod.app, name=name)
        else:
            getattr(mod, self.register)(app)


# In the order `spk-visor --help` lists them.
COMMANDS: dict[str, Lazy] = {
    "node": Lazy("spk_visor.commands.node"),
    "vm": Lazy("spk_visor.commands.vm"),
    "iommu": Lazy("spk_visor.commands.iommu"),
    "vfio": Lazy("spk_visor.commands.vfio"),
    "pci": Lazy("spk_visor.commands.pci"),
    "reboot-uefi": Lazy("spk_visor.commands.reboot_uefi"),
    "ota": Lazy("spk_visor.commands.ota"),
    "entire-system-upgrade": Lazy("spk_visor.commands.ota", "register_aliases"),
    "deploy": Lazy("spk_visor.commands.deploy"),
    "receive-deploy": Lazy("spk_visor.commands.deploy", "register_aliases"),
    "deploy-system-img-copy": Lazy("spk_visor.commands.deploy", "register_aliases"),
    "image": Lazy("spk_visor.commands.image"),
    "version": Lazy("spk_visor.commands.about", "register"),
    "about": Lazy("spk_visor.commands.about", "register"),
    "help": Lazy("spk_visor.commands.about", "register"),
    "system-install": Lazy("spk_visor.commands.sealed", "register"),
    "userland-install": Lazy("spk_visor.commands.sealed", "register"),
}


class LazyGroup(TyperGroup):
    """A TyperGroup whose COMMANDS entries become click commands when first asked for."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self._loaded: dict[str, _click.Command] = {}

    def list_commands(self, ctx: _click.Context) -> list[str]:
        return [*COMMANDS, *(n for n in super().list_commands(ctx) if n not in COMMANDS)]

    def get_command(self, ctx: _click.Context, cmd_name: str) -> _click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        if cmd_name not in self._loaded:
            # Built the way add_typer / app.command build it, on a throwaway app that has
            # the root's markup setting, then taken out by name.
            holder = typer.Typer(rich_markup_mode=None)
            entry.attach(cmd_name, holder)
            command = _as_command(typer.main.get_group(holder).commands[cmd_name])
            # Without this, Typer imports pydantic on every run (~0.2 s): see typer_fast.
            typer_fast.install(command, ctx)
            number_options.install(command)
            help_names.install(command)
            self._loaded[cmd_name] = command
        return self._loaded[cmd_name]

    def load_all(self, ctx: _click.Context) -> None:
        """Load every command into `self.commands`, for code that walks that dict (the man
        page generator, tests)."""
        for name in COMMANDS:
            command = self.get_command(ctx, name)
            if command is not None:
                self.commands[name] = command


def _as_command(command: _click.Command) -> _click.Command:
    """A group with a callback and no subcommands (node, iommu, pci, reboot-uefi) as the
    single command it is: its usage then reads `spk-visor pci [OPTIONS]`, not `COMMAND
    [ARGS]...`, and a stray word is an unexpected argument, not an unknown command."""
    if not isinstance(command, TyperGroup) or command.commands:
        return command
    return TyperCommand(
        command.name,
        context_settings=dict(command.context_settings),
        callback=command.callback,
        params=command.params,
        help=command.help,
        epilog=command.epilog,
        short_help=command.short_help,
        options_metavar=command.options_metavar,
        add_help_option=command.add_help_option,
        hidden=command.hidden,
        deprecated=bool(command.deprecated),
        rich_markup_mode=None,
    )
