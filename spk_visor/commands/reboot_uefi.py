"""`spk-visor reboot-uefi`: reboot the node straight into its firmware setup (to turn on
VT-d / AMD-Vi, say). Asks first; `--yes` for scripts. Exit 3 with the reason where the
firmware cannot do it."""

from __future__ import annotations

from typing import Annotated

import typer

from smechvisord import protocol as p
from spk_visor import hostops
from spk_visor.client import Client, JsonDoc
from spk_visor.commands.common import JsonOpt, confirm, state
from spk_visor.progress import waiting

app = typer.Typer(
    help="Reboot the node into UEFI firmware setup (asks first); running VMs are shut "
    "down gracefully first, and VMMs smechvisord did not start end with the reboot.",
    invoke_without_command=True,
)


def report(node: str, doc: JsonDoc) -> str:
    lines = [f"{node} is rebooting into firmware setup."]
    for vm in doc.get("vms") or []:
        outcome = vm.get("state") or f"error: {vm.get('error')}"
        lines.append(f"  VM {vm.get('id')}: {outcome}")
    return "\n".join(lines)


@app.callback(invoke_without_command=True)
def reboot_uefi(
    ctx: typer.Context,
    *,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask (for scripts): reboot now.")
    ] = False,
    timeout: Annotated[
        int | None,
        typer.Option(
            "--timeout",
            "-t",
            metavar="SECONDS",
            min=1,
            max=p.MAX_SHUTDOWN_TIMEOUT,
            help="How long each running VM gets to shut down gracefully "
            f"[default: {p.DEFAULT_SHUTDOWN_TIMEOUT}].",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Reboot into firmware setup: running VMs are shut down gracefully first."""
    st = state(ctx, as_json)

    def ask(plan: hostops.RebootPlan) -> bool:
        vms = ", ".join(plan.live_vms)
        stopping = f"its running VMs ({vms}) are shut down first" if vms else "no VM is running"
        if plan.unmanaged_vms:
            if not vms:
                stopping = "no VM of smechvisord's is running"
            stopping += (
                f"; VMMs it did not start ({', '.join(plan.unmanaged_vms)}) are not shut "
                "down: the reboot ends them"
            )
        return confirm(
            st,
            f"Reboot {plan.node} into firmware setup? {stopping}.",
            yes=yes,
            action=f"reboot {plan.node}",
        )

    def work(c: Client) -> JsonDoc:
        return hostops.reboot_to_firmware_setup(
            c,
            ask,
            timeout_seconds=timeout,
            base_timeout=st.settings.timeout,
            waiting=lambda at_most: waiting(st.console, "Shutting down VMs and rebooting", at_most),
        )

    doc = st.one(work)
    if st.json:
        st.console.json(doc)
    else:
        st.console.print(report(st.settings.targets[0].name, doc))
