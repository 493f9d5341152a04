"""`spk-visor node`: the node's host facts."""

from __future__ import annotations

from typing import Any

import typer

from spk_visor.client import Client
from spk_visor.commands.common import JsonOpt, show_fleet, state
from spk_visor.output import Column, duration, mib

app = typer.Typer(
    help="Show the node: CPU, memory, uptime, KVM, VMM, IOMMU.", invoke_without_command=True
)


def summary(doc: dict[str, Any]) -> str:
    vmm = doc.get("vmm") or {}
    vmm_text = (
        f"cloud-hypervisor {vmm.get('version') or '(version unknown)'} ({vmm.get('path')})"
        if vmm.get("available")
        else "not installed"
    )
    rows = [
        ("Node", f"{doc.get('hostname', '?')} (smechvisord {doc.get('daemon_version', '?')})"),
        (
            "CPU",
            f"{doc['cpu_model']}: {doc['cpu_cores']} cores / {doc.get('cpu_threads', '?')} threads",
        ),
        ("Memory", f"{mib(doc['memory_used_mb'])} used of {mib(doc['memory_total_mb'])}"),
        ("Uptime", duration(doc["uptime_seconds"])),
        ("Kernel", str(doc.get("kernel", "?"))),
        ("Boot", str(doc.get("boot_mode", "?")).upper()),
        ("KVM", "available" if doc["kvm_available"] else "not available (/dev/kvm missing)"),
        ("VMM", vmm_text),
        ("IOMMU", "ready" if doc.get("iommu_ready") else "not ready (spk-visor iommu)"),
        ("VMs", f"{doc.get('vms_running', 0)} running"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


FLEET_HEADERS = [
    Column("cpu", fit="cut"),
    Column("cores"),
    Column("memory"),
    Column("uptime"),
    Column("vms"),
]


def fleet_row(doc: dict[str, Any]) -> list[Any]:
    return [
        doc["cpu_model"],
        doc["cpu_cores"],
        f"{mib(doc['memory_used_mb'])}/{mib(doc['memory_total_mb'])}",
        duration(doc["uptime_seconds"]),
        doc.get("vms_running", 0),
    ]


@app.callback(invoke_without_command=True)
def node(
    ctx: typer.Context,
    as_json: JsonOpt = False,
) -> None:
    """Show the node's host facts (--json: the daemon's /api/node document)."""
    st = state(ctx, as_json)
    if st.settings.fleet:
        code = show_fleet(st, st.fleet(Client.node), FLEET_HEADERS, fleet_row)
        raise typer.Exit(code)
    doc = st.one(Client.node)
    if st.json:
        st.console.json(doc)
    else:
        st.console.lines(summary(doc))
