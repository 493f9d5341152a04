"""`system-install` and `userland-install`: SmechVisor is sealed; they refuse (exit 3)."""

from __future__ import annotations

import typer

from spk_visor.errors import RefusedError

HINT = "the system changes only through signed updates: use `spk-visor ota`"


def register(app: typer.Typer) -> None:
    @app.command(
        "system-install",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def system_install() -> None:
        """Refused: SmechVisor is sealed (use `spk-visor ota`)."""
        raise RefusedError("system-install is not available: SmechVisor is sealed", HINT)

    @app.command(
        "userland-install",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def userland_install() -> None:
        """Refused: SmechVisor is sealed (use `spk-visor ota`)."""
        raise RefusedError("userland-install is not available: SmechVisor is sealed", HINT)
