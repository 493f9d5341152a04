"""`spk-visor pci`: the node's PCI devices, their drivers, IOMMU groups and whether each
can be passed through to a VM."""

from __future__ import annotations

from typing import Any

import typer

from spk_visor.client import Client, JsonDoc
from spk_visor.commands.common import JsonOpt, show_fleet, state
from spk_visor.output import table

app = typer.Typer(
    help="List PCI devices: driver, IOMMU group, passthrough viability.",
    invoke_without_command=True,
)

# The long free text (why a device is not viable) goes last, so the table stays readable.
HEADERS = ["address", "class", "vendor:device", "driver", "group", "host-critical", "viable"]
FLEET_HEADERS = ["devices", "viable", "on vfio-pci", "host-critical"]


def viability(dev: JsonDoc) -> str:
    if dev.get("viable"):
        return "yes"
    reasons = dev.get("reasons") or []
    return "no: " + "; ".join(reasons) if reasons else "no"


def row(dev: JsonDoc) -> list[Any]:
    return [
        dev.get("address"),
        dev.get("class_name") or dev.get("class_id"),
        f"{dev.get('vendor_id')}:{dev.get('device_id')}",
        dev.get("driver"),
        dev.get("iommu_group"),
        dev.get("host_critical"),
        viability(dev),
    ]


def fleet_row(devices: list[JsonDoc]) -> list[Any]:
    critical = [
        f"{d.get('address')} ({d.get('host_critical')})" for d in devices if d.get("host_critical")
    ]
    return [
        len(devices),
        sum(1 for d in devices if d.get("viable")),
        sum(1 for d in devices if d.get("driver") == "vfio-pci"),
        ", ".join(critical) or "-",
    ]


@app.callback(invoke_without_command=True)
def pci(
    ctx: typer.Context,
    as_json: JsonOpt = False,
) -> None:
    """List the node's PCI devices (--fleet: a summary row per node)."""
    st = state(ctx, as_json)
    if st.settings.fleet:
        raise typer.Exit(show_fleet(st, st.fleet(Client.pci), FLEET_HEADERS, fleet_row))
    devices = st.one(Client.pci)
    if st.json:
        st.console.json(devices)
    else:
        st.console.print(table(HEADERS, [row(d) for d in devices]))
