"""Host work the CLI asks of a node: VFIO and the reboot into firmware setup. These turn
the daemon's refusals into errors that say what blocks the operation and what to do."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from smechvisord import protocol as p
from spk_visor.client import Client, JsonDoc
from spk_visor.errors import DaemonError, RefusedError
from spk_visor.vmops import ESCALATION_SECONDS, REBOOT_COMMAND_SECONDS


def set_vfio(client: Client, enable: bool) -> JsonDoc:
    """Load (`modprobe vfio-pci`) or unload vfio-pci on the node.

    Raises:
        RefusedError: enabling while the IOMMU is not ready; the message lists the blockers.
    """
    try:
        return client.set_vfio(enable)
    except DaemonError as e:
        if e.code != p.ERR_IOMMU_NOT_READY:
            raise
        blockers = [str(b) for b in e.details.get("blockers") or []] or [e.message]
        raise RefusedError(
            f"{e.node}: vfio-pci was not loaded: the IOMMU is not ready:\n"
            + "\n".join(f"  - {b}" for b in blockers),
            "`spk-visor iommu` shows each check and how to fix it",
        ) from e


@dataclass(frozen=True)
class RebootPlan:
    """What a reboot into firmware setup will do, for the operator to confirm."""

    node: str
    support: JsonDoc
    live_vms: list[str] = field(default_factory=list)
    # VMMs smechvisord did not start: it cannot shut them down, so the reboot ends them.
    unmanaged_vms: list[str] = field(default_factory=list)


def reboot_budget(timeout_seconds: int | None) -> float:
    """The most seconds the daemon may take to answer: every VM shut down (in parallel,
    each with its escalation), then the reboot command."""
    graceful = timeout_seconds or p.DEFAULT_SHUTDOWN_TIMEOUT
    return graceful + ESCALATION_SECONDS + REBOOT_COMMAND_SECONDS


def reboot_to_firmware_setup(
    client: Client,
    confirm: Callable[[RebootPlan], bool],
    *,
    timeout_seconds: int | None,
    base_timeout: float,
    waiting: Callable[[float], AbstractContextManager[object]] = lambda _s: nullcontext(),
) -> JsonDoc:
    """Ask whether the firmware can boot into setup; if so and `confirm(plan)` agrees,
    set OsIndications, stop the VMs gracefully and reboot the node. `waiting(seconds)`
    wraps the long request (the CLI's progress bar), after the confirmation.

    Raises:
        RefusedError: the firmware cannot (with the reason), or the answer was no.
    """
    support = client.reboot_support()
    if not support.get("supported"):
        raise RefusedError(
            f"{client.transport.address}: cannot reboot into firmware setup: "
            f"{support.get('reason') or 'the node says it is not supported'}"
        )
    vms = client.vms()
    live = [str(vm["id"]) for vm in vms if vm.get("managed") and vm.get("state") in p.LIVE_STATES]
    unmanaged = [str(vm["id"]) for vm in vms if not vm.get("managed", True)]
    if not confirm(RebootPlan(client.target.name, support, live, unmanaged)):
        raise RefusedError(f"{client.target.name} was not rebooted: not confirmed")
    budget = reboot_budget(timeout_seconds)
    with waiting(budget):
        return client.reboot_uefi(timeout_seconds=timeout_seconds, wait=base_timeout + budget)
