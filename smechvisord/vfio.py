"""Load and unload the vfio-pci driver (POST /api/vfio).

Only the module operation lives here. Whether the host may do it (IOMMU readiness) is the
caller's decision, made before calling: this module does not read the host.
"""

from __future__ import annotations

from typing import TypedDict

from smechvisord.hostcmd import HostCommandError, run_host_command, tail

VFIO_MODULE = "vfio-pci"


class VfioError(HostCommandError):
    """modprobe failed: carries `command`, `exit_code` and the `stderr` tail."""


class VfioResult(TypedDict):
    enabled: bool
    command: list[str]
    output: str


def vfio_command(enable: bool, modprobe: tuple[str, ...]) -> list[str]:
    """The exact argv `set_vfio` runs; also what a dry run would show."""
    return [*modprobe, VFIO_MODULE] if enable else [*modprobe, "-r", VFIO_MODULE]


def set_vfio(enable: bool, modprobe: tuple[str, ...], timeout: float = 30.0) -> VfioResult:
    """`modprobe vfio-pci` (enable) or `modprobe -r vfio-pci`; VfioError on failure.

    Loading a module that is already loaded exits 0. Removing is not idempotent: kmod's
    `modprobe -r` exits 1 when the module is not loaded ("not in kernel"), is built in,
    or is in use by a bound device; its stderr says which, and the error carries it. A
    caller that wants "disable" to succeed when already disabled checks first.
    """
    command = vfio_command(enable, modprobe)
    try:
        result = run_host_command(command, timeout)
    except HostCommandError as exc:
        raise VfioError(exc.command, exc.exit_code, exc.stderr, exc.reason) from exc
    return {
        "enabled": enable,
        "command": command,
        "output": tail(result.stdout + result.stderr),
    }
