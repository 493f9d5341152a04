"""`spk-visor vfio enable|disable|status`: the vfio-pci module that passthrough needs.
Enabling is refused (exit 3, with the blockers) while the IOMMU is not ready."""

from __future__ import annotations

import shlex

import typer

from spk_visor import hostops
from spk_visor.client import Client, JsonDoc
from spk_visor.commands.common import JsonOpt, state

app = typer.Typer(help="Load or unload vfio-pci (refused while the IOMMU is not ready).")


def status_text(doc: JsonDoc) -> str:
    iommu = "ready" if doc.get("ready") else "not ready"
    lines = [
        f"vfio-pci: {'loaded' if doc.get('loaded') else 'not loaded'}",
        f"IOMMU:    {iommu}",
    ]
    lines += [f"  - {b}" for b in doc.get("blockers") or []]
    return "\n".join(lines)


def change_text(doc: JsonDoc) -> str:
    command = doc.get("command")
    verb = "Enabled" if doc.get("enabled") else "Disabled"
    if not command:
        # Nothing ran: disabling a module that is not loaded is a no-op.
        return f"{doc.get('output') or 'nothing to do'}; nothing changed."
    lines = [f"{verb} vfio-pci: ran {shlex.join(command)}"]
    if doc.get("output"):
        lines.append(str(doc["output"]).rstrip())
    lines.append(f"vfio-pci: {'loaded' if doc.get('loaded') else 'not loaded'}")
    return "\n".join(lines)


@app.command()
def status(
    ctx: typer.Context,
    as_json: JsonOpt = False,
) -> None:
    """Show whether vfio-pci is loaded and whether the IOMMU allows it."""
    st = state(ctx, as_json)
    doc = st.one(Client.vfio_status)
    if st.json:
        st.console.json(doc)
    else:
        st.console.lines(status_text(doc))


@app.command()
def enable(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Load vfio-pci (modprobe vfio-pci); refused while the IOMMU is not ready."""
    st = state(ctx, as_json)
    doc = st.one(lambda c: hostops.set_vfio(c, True))
    st.show(doc, change_text)


@app.command()
def disable(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Unload vfio-pci (modprobe -r vfio-pci)."""
    st = state(ctx, as_json)
    doc = st.one(lambda c: hostops.set_vfio(c, False))
    st.show(doc, change_text)
