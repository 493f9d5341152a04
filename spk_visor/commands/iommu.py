"""`spk-visor iommu`: is the node ready for PCI passthrough? The three checks as a
checklist, with the fix for each one that fails. Exit 0 when ready, 3 when not."""

from __future__ import annotations

from typing import Any

import typer

from spk_visor.client import Client, JsonDoc
from spk_visor.commands.common import JsonOpt, show_fleet, state
from spk_visor.errors import ExitCode
from spk_visor.output import Column

app = typer.Typer(
    help="Check the IOMMU (CPU virtualization, IOMMU groups, kernel command line); "
    "exit 0 when ready for passthrough, 3 when not.",
    invoke_without_command=True,
)

# ASCII marks: they survive pipes, logs, serial consoles and every locale.
OK, FAIL = "[ok]  ", "[FAIL]"


def checklist(doc: JsonDoc) -> str:
    checks = doc.get("checks") or []
    failed = [c for c in checks if not c.get("ok")]
    if doc.get("ready"):
        head = "IOMMU: ready for passthrough"
    else:
        head = f"IOMMU: not ready ({len(failed)} of {len(checks)} checks failed)"
    lines = [head]
    for check in checks:
        lines.append(
            f"  {OK if check.get('ok') else FAIL} {check.get('label')}: {check.get('detail')}"
        )
        if not check.get("ok") and check.get("fix"):
            lines.append(f"         fix: {check['fix']}")
    return "\n".join(lines)


FLEET_HEADERS = [Column("ready"), Column("blockers", absent="none", fit="wrap")]


def fleet_row(doc: JsonDoc) -> list[Any]:
    return ["yes" if doc.get("ready") else "no", "; ".join(doc.get("blockers") or []) or None]


def exit_code(doc: JsonDoc | None) -> ExitCode:
    return ExitCode.OK if doc and doc.get("ready") else ExitCode.REFUSED


@app.callback(invoke_without_command=True)
def iommu(
    ctx: typer.Context,
    as_json: JsonOpt = False,
) -> None:
    """Check the IOMMU; exit 0 when ready for passthrough, 3 when not."""
    st = state(ctx, as_json)
    if st.settings.fleet:
        results = st.fleet(Client.iommu)
        code = show_fleet(st, results, FLEET_HEADERS, fleet_row)
        # Every node answered: the group is ready only when each node is.
        if code == ExitCode.OK:
            code = max((exit_code(r.value) for r in results), default=ExitCode.OK)
        raise typer.Exit(code)
    doc = st.one(Client.iommu)
    if st.json:
        st.console.json(doc)
    else:
        st.console.lines(checklist(doc))
    raise typer.Exit(exit_code(doc))
