"""`spk-visor about` and `spk-visor version`."""

from __future__ import annotations

import typer

from smechvisord.version import VERSION


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
            "The system is updated only with signed bundles: see `spk-visor ota`."
        )
