"""VM work the CLI asks of a node: sizes people type, how long each action may take, and
following a serial log. Everything here returns the daemon's documents; nothing prints.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from fractions import Fraction

from smechvisord import protocol as p
from spk_visor.client import Client, JsonDoc
from spk_visor.errors import DaemonError, RefusedError

# The daemon's escalation after the graceful wait: vm.shutdown+vmm.shutdown, SIGTERM and
# SIGKILL, 5 s each (smechvisord/vms.py STEP_WAIT; design/daemon.md).
ESCALATION_SECONDS = 15.0
# The daemon waits this long for a new VMM's first vmm.ping (smechvisord settings
# vmm_ready_timeout) before it answers a create or start.
VMM_READY_SECONDS = 10.0
# The reboot command runs under this timeout on the node (smechvisord/api.py).
REBOOT_COMMAND_SECONDS = 60.0

# `vm console --follow`: poll quickly while output flows, back off while the guest is
# quiet, never slower than MAX so new output shows within a couple of seconds.
MIN_POLL_SECONDS = 0.25
MAX_POLL_SECONDS = 2.0
# How much already-printed log each poll reads again to tell a rewritten file from the same
# one: enough to span a few lines of a boot (kernel timestamps differ between boots).
OVERLAP_BYTES = 1024

# A B (or iB) only after a unit letter: "512B" is not 512 MiB.
_SIZE_RE = re.compile(r"^\s*(\d+)(?:\.(\d+))?\s*(?:([KMGT])(?:I?B)?)?\s*$", re.IGNORECASE)
# Binary units, as cloud-hypervisor reads `size=4G`: people who type 4G mean 4096 MiB.
_UNIT_MIB: dict[str, Fraction] = {
    "K": Fraction(1, 1024),
    "": Fraction(1),
    "M": Fraction(1),
    "G": Fraction(1024),
    "T": Fraction(1024 * 1024),
}
# Past this no request can carry it (a JSON integer consumers hold is 64-bit), and the
# exact arithmetic below stays cheap: no node has 2**63 MiB.
MAX_MIB = 2**63 - 1
# A whole number of MiB needs at most 20 decimals (1 / 1024**2 of a T); more non-zero
# decimals cannot be whole, and an unbounded run of digits would be slow to convert.
_MAX_DECIMALS = 20


def parse_memory(text: str) -> int:
    """MiB from what people type: '512' (MiB), '512M', '4G', '4GiB', '1.5G'. Exact
    (no float rounding), so the number the daemon may refuse is the one typed.

    Raises:
        ValueError: the text is not a size, not a whole number of MiB, or absurdly large.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r}: expected MiB (512) or a size such as 512M or 4G")
    whole, decimals = m.group(1).lstrip("0"), (m.group(2) or "").rstrip("0")
    shown = text.strip() if len(text) <= 40 else text.strip()[:37] + "..."
    if len(whole) > len(str(MAX_MIB)):
        raise ValueError(f"{shown!r} is too large for any node's memory")
    if len(decimals) > _MAX_DECIMALS:
        raise ValueError(f"{shown!r} is not a whole number of MiB")
    number = int(whole or "0") + Fraction(int(decimals or "0"), 10 ** len(decimals))
    mib = number * _UNIT_MIB[(m.group(3) or "").upper()]
    if mib.denominator != 1:
        raise ValueError(f"{shown!r} is not a whole number of MiB")
    if mib < 1:
        raise ValueError(f"{shown!r} is less than 1 MiB")
    if mib > MAX_MIB:
        raise ValueError(f"{shown!r} is too large for any node's memory")
    return int(mib)


@dataclass(frozen=True)
class VmSpec:
    cpus: int
    memory_mb: int
    disk: str
    name: str | None = None


def action_budget(action: str, timeout_seconds: int | None = None) -> float:
    """The most seconds the daemon may spend on `action` before it answers (0 for the
    actions that answer at once)."""
    if action == "shutdown":
        return (timeout_seconds or p.DEFAULT_SHUTDOWN_TIMEOUT) + ESCALATION_SECONDS
    if action == "stop":
        return ESCALATION_SECONDS
    if action in ("start", "create"):
        return VMM_READY_SECONDS
    return 0.0


def action_wait(action: str, base_timeout: float, timeout_seconds: int | None = None) -> float:
    """How long the HTTP request of `action` may take, so the client does not give up
    while the daemon is still booting a VMM or working through its escalation ladder."""
    return base_timeout + action_budget(action, timeout_seconds)


def create(client: Client, spec: VmSpec, *, dry_run: bool, base_timeout: float) -> JsonDoc:
    """Create (and boot) a VM, or with `dry_run` get the exact VMM argv and the problems
    a real create would hit."""
    return client.create_vm(
        cpus=spec.cpus,
        memory_mb=spec.memory_mb,
        disk=spec.disk,
        name=spec.name,
        dry_run=dry_run,
        wait=None if dry_run else action_wait("create", base_timeout),
    )


def act(
    client: Client,
    vm_id: str,
    action: str,
    *,
    base_timeout: float,
    timeout_seconds: int | None = None,
) -> JsonDoc:
    """Run one lifecycle action (start, shutdown, stop, reboot, pause, resume)."""
    if action not in p.VM_ACTIONS:
        raise ValueError(f"unknown VM action {action!r}")
    return client.vm_action(
        vm_id,
        action,
        timeout_seconds=timeout_seconds,
        wait=action_wait(action, base_timeout, timeout_seconds),
    )


def delete(client: Client, vm_id: str, confirm: Callable[[JsonDoc], bool]) -> JsonDoc:
    """Delete a stopped VM's record and logs once `confirm(vm)` says yes.

    Raises:
        RefusedError: the VM is still live (nothing is asked), or the answer was no.
    """
    vm = client.vm(vm_id)
    if vm.get("state") in p.LIVE_STATES:
        # Asking first and failing after would waste the operator's "yes".
        raise RefusedError(
            f"VM {vm_id} is {vm.get('state')}; it must be stopped before it is deleted",
            f"spk-visor vm shutdown {vm_id}",
        )
    if not confirm(vm):
        raise RefusedError(f"VM {vm_id} was not deleted: not confirmed")
    return client.delete_vm(vm_id)


# How a followed console ended when the VM went away between two polls.
DELETED = "deleted"


def console(
    client: Client,
    vm_id: str,
    *,
    follow: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> Generator[JsonDoc, None, str | None]:
    """The serial log: its tail, then (with `follow`) each new chunk as it arrives, until
    the VM is no longer live and everything it wrote has been yielded, or the caller stops
    iterating (Ctrl-C). Yields the daemon's console documents; while following, each
    covers only bytes not yielded before. Returns the state that ended the follow (the
    VM's, or DELETED), or None when nothing ended it (no follow).

    Raises:
        RefusedError: asked to follow a VM that is not live (after yielding its tail).
    """
    doc = client.console(vm_id)
    yield doc
    if not follow:
        return None
    # A daemon without "state" in its console documents: follow until Ctrl-C, as before.
    if not _live(doc):
        raise RefusedError(
            f"VM {vm_id} {ended_words(str(doc['state']))}: there is nothing to follow "
            f"(spk-visor vm start {vm_id})"
        )
    offset = int(doc["next_offset"])
    check = _check_text(str(doc.get("data", "")))
    pause = MIN_POLL_SECONDS
    while True:
        # Ask from a little before the offset: the VMM starts the file over (File::create)
        # each time it rebuilds the VM (start, reboot), and a new log as long as the old
        # one is only told apart by its content.
        overlap = len(check.encode())
        try:
            doc = client.console(vm_id, offset=offset - overlap, max_bytes=p.MAX_CONSOLE_BYTES)
        except DaemonError as e:
            if e.code != p.ERR_NOT_FOUND:
                raise
            return DELETED  # only a stopped VM can be deleted: its log is gone with it
        data = str(doc.get("data", ""))
        if int(doc["size"]) < offset or not data.startswith(check):
            offset, check = 0, ""  # a new log: read it from the top
            continue
        new = data[len(check) :]
        if new:
            yield {**doc, "offset": offset, "data": new}
            check = _check_text(check + new)
        offset = int(doc["next_offset"])
        if offset < int(doc["size"]):
            continue  # more than one chunk waiting: read on without sleeping
        if not _live(doc):
            # Read to the end after the VM stopped: a VMM writes nothing more once gone.
            return str(doc["state"])
        pause = MIN_POLL_SECONDS if new else min(MAX_POLL_SECONDS, pause * 2)
        sleep(pause)


def ended_words(state: str) -> str:
    """How a VM that is no longer live is said after its id: "is stopped", "has failed",
    "was deleted"."""
    return {p.STATE_FAILED: "has failed", DELETED: "was deleted"}.get(state, f"is {state}")


def _live(doc: JsonDoc) -> bool:
    state = doc.get("state")
    return state is None or state in p.LIVE_STATES


def _check_text(text: str) -> str:
    """The end of what was printed, to recognise the same file on the next poll: at most
    OVERLAP_BYTES, and nothing before a U+FFFD (a replaced byte does not encode back to
    the bytes on disk, so the byte offsets would no longer line up)."""
    tail = text[-OVERLAP_BYTES:].rpartition("\ufffd")[2]
    while len(tail.encode()) > OVERLAP_BYTES:
        tail = tail[1:]
    return tail
