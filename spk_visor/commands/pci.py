"""`spk-visor pci`: the node's PCI devices, their drivers, IOMMU groups and whether each
can be passed through to a VM."""

from __future__ import annotations

from typing import Any

import typer

from spk_visor.client import Client, JsonDoc
from spk_visor.commands.common import JsonOpt, show_fleet, state
from spk_visor.output import Column, Noted

app = typer.Typer(
    help="List PCI devices: driver, IOMMU group, passthrough viability "
    "(--fleet: a summary row per node).",
    invoke_without_command=True,
)

# Why a device is not viable is a numbered note under the table: the same reason (no
# IOMMU group, say) holds for many devices and is printed once.
HEADERS = [
    Column("address"),
    Column("class", fit="wrap"),
    Column("pci id"),  # vendor:device
    Column("driver", absent="none", fit="wrap"),
    Column("group", absent="none"),
    Column("critical"),  # to the host: see the reasons
    Column("viable"),
]
FLEET_HEADERS = [
    Column("devices"),
    Column("viable"),
    Column("on vfio-pci"),
    Column("host-critical", absent="none", fit="wrap"),
]


def viability(dev: JsonDoc) -> Noted:
    if dev.get("viable"):
        return Noted("yes")
    return Noted("no", [str(r) for r in dev.get("reasons") or []])


def row(dev: JsonDoc) -> list[Any]:
    return [
        dev.get("address"),
        dev.get("class_name") or dev.get("class_id"),
        f"{dev.get('vendor_id')}:{dev.get('device_id')}",
        dev.get("driver"),
        dev.get("iommu_group"),
        # What makes it critical is one of the reasons under the table.
        "yes" if dev.get("host_critical") else "no",
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
        ", ".join(critical) or None,
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
        st.console.table(HEADERS, [row(d) for d in devices])
