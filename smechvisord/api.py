"""What each API route does. HTTP mechanics are in server.py; host reads in host.py,
iommu.py and pci.py; VM work in vms.py. Routes validate, call one of those, and answer."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smechvisord import efi, iommu, pci, validate, vfio
from smechvisord import protocol as p
from smechvisord.errors import ApiError, invalid
from smechvisord.host import Host, HostError
from smechvisord.hostcmd import HostCommandError, run_reboot
from smechvisord.server import Encoded, Handler, Request, Router
from smechvisord.settings import Settings
from smechvisord.vms import VmManager

log = logging.getLogger(__name__)

MAX_IMAGES = 1000
_DIGITS = re.compile(r"[0-9]{1,19}")
STEADY_TTL = 2.0
LIVE_TTL = 1.0


@dataclass
class VmmVersion:
    """`cloud-hypervisor --version`, asked once per binary (keyed by path and mtime)."""

    key: tuple[str, float] | None = None
    version: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, path: str) -> str | None:
        try:
            key = (path, os.stat(path).st_mtime)
        except OSError:
            return None
        with self.lock:
            if key != self.key:
                self.key, self.version = key, _ask_version(path)
            return self.version


def _ask_version(path: str) -> str | None:
    try:
        out = subprocess.run(
            [path, "--version"],
            capture_output=True,
            timeout=5,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout.decode("utf-8", "replace").strip()
    return text.split()[-1] if out.returncode == 0 and text else None


class TtlCache:
    """One value, recomputed when older than `ttl` seconds. Concurrent callers during a
    recompute get the previous value rather than queueing behind it."""

    def __init__(self, ttl: float, compute: Callable[[], dict[str, Any]]) -> None:
        self.ttl = ttl
        self.compute = compute
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def get(self) -> dict[str, Any]:
        value = self._value
        if value is not None and time.monotonic() - self._at < self.ttl:
            return value
        if value is not None and not self._lock.acquire(blocking=False):
            return value
        if value is None:
            self._lock.acquire()
        try:
            self._value, self._at = self.compute(), time.monotonic()
            return self._value
        finally:
            self._lock.release()


class Api:
    def __init__(self, settings: Settings, host: Host, vms: VmManager) -> None:
        self.settings = settings
        self.host = host
        self.vms = vms
        self._vmm_version = VmmVersion()
        self._reboot_lock = threading.Lock()
        # Re-read at most every STEADY_TTL seconds: these facts cost ~0.5 ms of sysfs and
        # file reads (more than the rest of the request) and change at human speed.
        self._steady = TtlCache(STEADY_TTL, self._steady_node)
        self._node_doc: tuple[int, float, Encoded] = (-1, 0.0, Encoded(b""))

    def router(self) -> Router:
        r = _GuardedRouter()
        r.add("GET", p.PATH_HEALTH, self.health, auth=False)
        r.add("GET", p.PATH_NODE, self.node)
        r.add("GET", p.PATH_VMS, self.list_vms)
        r.add("POST", p.PATH_VMS, self.create_vm)
        r.add("GET", p.PATH_VM, self.show_vm)
        r.add("DELETE", p.PATH_VM, self.delete_vm)
        r.add("GET", p.PATH_VM_CONSOLE, self.console)
        r.add("POST", p.PATH_VM_ACTION, self.vm_action)
        r.add("GET", p.PATH_IMAGES, self.images)
        r.add("GET", p.PATH_IOMMU, self.iommu)
        r.add("GET", p.PATH_VFIO, self.vfio_status)
        r.add("POST", p.PATH_VFIO, self.set_vfio)
        r.add("GET", p.PATH_PCI, self.pci)
        r.add("GET", p.PATH_REBOOT_UEFI, self.reboot_support)
        r.add("POST", p.PATH_REBOOT_UEFI, self.reboot_uefi)
        return r

    # ---- node ----------------------------------------------------------------------

    def health(self, req: Request) -> tuple[int, Any]:
        # The PID lets an OTA probation see a daemon that keeps restarting.
        return 200, {"status": "ok", "version": self.settings.version, "pid": os.getpid()}

    def _vmm(self) -> dict[str, Any]:
        path = shutil.which(self.settings.ch_bin)
        return {
            "bin": self.settings.ch_bin,
            "path": path,
            "available": path is not None,
            "version": self._vmm_version.get(path) if path else None,
            "firmware": str(self.settings.firmware),
            "firmware_present": self.settings.firmware.is_file(),
        }

    def node(self, req: Request) -> tuple[int, Any]:
        # Like Proxmox's pvestatd, serve node status from a cache refreshed at most once
        # a second (sooner when a VM changes): on these machines each small /proc read
        # costs 15-30 us, and a dashboard polls every 5 s anyway.
        generation, at, data = self._node_doc
        now = time.monotonic()
        if generation != self.vms.generation or now - at >= LIVE_TTL:
            generation = self.vms.generation
            doc: dict[str, Any] = {
                **self._steady.get(),
                **self.host.live_facts(),
                "vms_running": self.vms.running_count(),
                "daemon_version": self.settings.version,
            }
            data = Encoded(json.dumps(doc).encode())
            self._node_doc = (generation, now, data)
        return 200, data

    def _steady_node(self) -> dict[str, Any]:
        """The part of GET /api/node that costs file system walks and rarely changes."""
        doc: dict[str, Any] = dict(self.host.steady_facts())
        vmm = self._vmm()
        readiness = iommu.readiness(self.host)
        uefi_ok, uefi_reason = efi.firmware_setup_support(self._efi_dir())
        doc.update(
            {
                "vmm": vmm,
                "iommu_ready": readiness["ready"],
                "vfio_loaded": self.host.vfio_loaded(),
                # What this node can do, so the CLI and dashboard hide what it cannot.
                "capabilities": {
                    "create_vm": bool(doc["kvm_available"])
                    and vmm["available"]
                    and vmm["firmware_present"],
                    "vfio": readiness["ready"],
                    "reboot_uefi": uefi_ok,
                },
                "capability_reasons": {
                    "create_vm": _create_vm_blocker(doc, vmm),
                    "reboot_uefi": uefi_reason,
                    "vfio": "; ".join(_blockers(readiness)),
                },
                # Where a VM disk may come from (the dashboard's picker and path hint).
                "image_dirs": [str(d) for d in self.settings.image_dirs],
            }
        )
        return doc

    def _efi_dir(self) -> Path:
        return self.settings.host_path("/sys/firmware/efi")

    # ---- VMs -----------------------------------------------------------------------

    def list_vms(self, req: Request) -> tuple[int, Any]:
        return 200, Encoded(self.vms.list_all_encoded())

    def create_vm(self, req: Request) -> tuple[int, Any]:
        cpu = self.host.cpu()
        total_mb, _used = self.host.memory()
        spec = validate.create_vm(req.body, cpu.threads, total_mb, self.settings.image_dirs)
        return self.vms.create(spec)

    def show_vm(self, req: Request) -> tuple[int, Any]:
        return 200, self.vms.get(req.params["id"])

    def delete_vm(self, req: Request) -> tuple[int, Any]:
        return 200, self.vms.delete(req.params["id"])

    def vm_action(self, req: Request) -> tuple[int, Any]:
        action = req.params["action"]
        if action not in p.VM_ACTIONS:
            raise ApiError(
                404,
                p.ERR_NOT_FOUND,
                f"unknown VM action {action!r}; one of {', '.join(p.VM_ACTIONS)}",
                {"actions": list(p.VM_ACTIONS)},
            )
        allowed = {p.KEY_TIMEOUT} if action == "shutdown" else set()
        validate.only_keys(req.body, allowed=allowed, required=set())
        timeout = p.DEFAULT_SHUTDOWN_TIMEOUT
        if p.KEY_TIMEOUT in req.body:
            timeout = validate.integer(req.body, p.KEY_TIMEOUT, 1, p.MAX_SHUTDOWN_TIMEOUT)
        return 200, self.vms.action(req.params["id"], action, timeout)

    def console(self, req: Request) -> tuple[int, Any]:
        offset = _query_int(req, "offset", 0, 2**62)
        max_bytes = _query_int(req, "max_bytes", 1, p.MAX_CONSOLE_BYTES) or 16384
        return 200, self.vms.console(req.params["id"], offset, max_bytes)

    def _disks_in_use(self) -> dict[Path, list[str]]:
        """Resolved disk path -> the live VMs (ours or found running) that have it open."""
        used: dict[Path, list[str]] = {}
        for vm in self.vms.list_all():
            disk = vm.get("disk")
            if vm.get("state") in p.LIVE_STATES and isinstance(disk, str) and disk:
                used.setdefault(Path(disk).resolve(), []).append(str(vm.get("id")))
        return used

    def images(self, req: Request) -> tuple[int, Any]:
        found: list[dict[str, Any]] = []
        # One disk serves one live VM: say which images are taken, so a picker skips them.
        in_use = self._disks_in_use()
        for root in self.settings.image_dirs:
            try:
                entries = sorted(os.scandir(root), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if len(found) >= MAX_IMAGES:
                    break
                # The same rule POST /api/vms applies: a regular file once links resolve.
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=True):
                    continue
                real = Path(entry.path).resolve()
                if not any(real.is_relative_to(d.resolve()) for d in self.settings.image_dirs):
                    continue
                try:
                    size = real.stat().st_size
                except OSError:
                    # Removed (or made unreadable) since the listing: not an image any more,
                    # and no reason to fail the whole list.
                    continue
                found.append(
                    {
                        "path": entry.path,
                        "name": entry.name,
                        "dir": str(root),
                        "size_bytes": size,
                        "in_use": real in in_use,
                        "used_by": in_use.get(real, []),
                    }
                )
        return 200, found

    # ---- hardware ------------------------------------------------------------------

    def iommu(self, req: Request) -> tuple[int, Any]:
        return 200, iommu.readiness(self.host)

    def pci(self, req: Request) -> tuple[int, Any]:
        return 200, pci.list_devices(self.host)

    def vfio_status(self, req: Request) -> tuple[int, Any]:
        readiness = iommu.readiness(self.host)
        return 200, {
            "loaded": self.host.vfio_loaded(),
            "ready": readiness["ready"],
            "blockers": _blockers(readiness),
        }

    def set_vfio(self, req: Request) -> tuple[int, Any]:
        validate.only_keys(req.body, allowed={p.KEY_ENABLE}, required={p.KEY_ENABLE})
        enable = validate.boolean(req.body, p.KEY_ENABLE)
        readiness = iommu.readiness(self.host)
        # Unloading is always safe; loading vfio-pci without an IOMMU is not.
        if enable and not readiness["ready"]:
            blockers = _blockers(readiness)
            raise ApiError(
                409,
                p.ERR_IOMMU_NOT_READY,
                "the IOMMU is not ready: " + "; ".join(blockers),
                {"blockers": blockers},
            )
        if not enable and not self.host.vfio_loaded():
            # `modprobe -r` fails on a module that is not loaded; disabling is idempotent.
            return 200, {
                "enabled": False,
                "command": None,
                "output": "vfio-pci is not loaded",
                "loaded": False,
            }
        try:
            result = vfio.set_vfio(enable, self.settings.modprobe)
        except vfio.VfioError as e:
            raise ApiError(500, p.ERR_COMMAND_FAILED, str(e)) from e
        return 200, {**result, "loaded": self.host.vfio_loaded()}

    def reboot_support(self, req: Request) -> tuple[int, Any]:
        ok, reason = efi.firmware_setup_support(self._efi_dir())
        return 200, {"supported": ok, "reason": reason}

    def reboot_uefi(self, req: Request) -> tuple[int, Any]:
        validate.only_keys(
            req.body, allowed={p.KEY_CONFIRM, p.KEY_TIMEOUT}, required={p.KEY_CONFIRM}
        )
        if validate.boolean(req.body, p.KEY_CONFIRM) is not True:
            raise invalid(p.KEY_CONFIRM, "must be true: this reboots the node and stops its VMs")
        timeout = p.DEFAULT_SHUTDOWN_TIMEOUT
        if p.KEY_TIMEOUT in req.body:
            timeout = validate.integer(req.body, p.KEY_TIMEOUT, 1, p.MAX_SHUTDOWN_TIMEOUT)
        ok, reason = efi.firmware_setup_support(self._efi_dir())
        if not ok:
            raise ApiError(409, p.ERR_UNSUPPORTED, reason, {"supported": False})
        if not self._reboot_lock.acquire(blocking=False):
            raise ApiError(409, p.ERR_BUSY, "a reboot is already in progress")
        try:
            try:
                written = efi.request_firmware_setup(self.host.efivars_dir())
            except efi.EfiError as e:
                raise ApiError(500, p.ERR_COMMAND_FAILED, str(e)) from e
            stopped = self.vms.stop_all(timeout)
            try:
                run_reboot(self.settings.reboot_cmd, timeout=60)
            except HostCommandError as e:
                # No reboot is coming: withdraw the request, or whatever reboots the node
                # next (an OTA update, a power cut) lands it in firmware setup.
                try:
                    withdrawn = efi.withdraw_firmware_setup(self.host.efivars_dir(), written)
                except efi.EfiError as undo:
                    withdrawn = False
                    log.warning("could not withdraw the firmware-setup request: %s", undo)
                raise ApiError(
                    500,
                    p.ERR_COMMAND_FAILED,
                    f"reboot command failed: {e}",
                    {"os_indications": written, "withdrawn": withdrawn, "vms": stopped},
                ) from e
        finally:
            self._reboot_lock.release()
        return 202, {"rebooting": True, "os_indications": written, "vms": stopped}


class _GuardedRouter(Router):
    """Every route's unreadable host file becomes a JSON 500 that names the file."""

    def add(self, method: str, template: str, handler: Handler, auth: bool = True) -> None:
        def guarded(req: Request) -> tuple[int, Any]:
            try:
                return handler(req)
            except HostError as e:
                raise ApiError(500, p.ERR_INTERNAL, f"cannot read host facts: {e}") from e

        super().add(method, template, guarded, auth)


def _query_int(req: Request, key: str, low: int, high: int) -> int | None:
    raw = req.query.get(key)
    if raw is None:
        return None
    # ASCII digits only: str.isdigit() is also true of '²', which int() then rejects.
    if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise invalid(key, f"must be an integer between {low} and {high}")
    return int(raw)


def _create_vm_blocker(doc: dict[str, Any], vmm: dict[str, Any]) -> str:
    """Why this node cannot create VMs ("" when it can): a base image built without a
    VMM says so here rather than failing at the first create."""
    reasons = []
    if not doc["kvm_available"]:
        reasons.append("/dev/kvm is missing (no hardware virtualisation, or kvm not loaded)")
    if not vmm["available"]:
        reasons.append(f"cloud-hypervisor is not installed ({vmm['bin']} not found)")
    if not vmm["firmware_present"]:
        reasons.append(f"the VM firmware {vmm['firmware']} is missing")
    return "; ".join(reasons)


def _blockers(readiness: dict[str, object]) -> list[str]:
    value = readiness["blockers"]
    return [str(b) for b in value] if isinstance(value, list) else []
