"""Block devices the receiver could install to, and why the others are ineligible.

Read before any network traffic (deploy.md, "What the receiver does on the disk", step 1):
`lsblk -J -b` for the tree, `wipefs -n` for signatures lsblk cannot see (a bare GPT with
no partitions, a filesystem lsblk's cache missed). A disk is named to the donor by serial
(and size), never by kernel name, which moves between boots.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The volume ID the shim ISO is built with (shim_iso): the disk carrying it is the boot medium.
SHIM_VOLUME_ID = "SPK_SHIM"
LSBLK_COLUMNS = (
    "NAME,PATH,SIZE,LOG-SEC,PHY-SEC,MODEL,SERIAL,WWN,TRAN,ROTA,RM,RO,TYPE,FSTYPE,LABEL,PTTYPE,"
    "MOUNTPOINTS"
)
# Holders that mean "in use by a volume manager" when they sit below a disk.
_STACKED = ("lvm", "crypt", "dm", "md", "raid")
_NEVER = ("ram", "zram", "rom")
_TIMEOUT_S = 30
# wipefs probes run side by side (each is mostly process start-up).
PROBES_AT_ONCE = 4


@dataclass
class Disk:
    name: str  # kernel name, for local use only (moves between boots)
    path: str
    size: int
    logical_sector: int
    physical_sector: int
    model: str
    serial: str
    wwn: str
    transport: str
    rotational: bool
    removable: bool
    read_only: bool
    has_signatures: bool
    mounted: bool
    boot_medium: bool
    eligible: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_doc(self) -> dict[str, Any]:
        """The HELLO inventory entry (no kernel path: the donor names disks by serial)."""
        doc = asdict(self)
        doc.pop("path")
        return doc


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)


def _walk(dev: dict[str, Any]) -> list[dict[str, Any]]:
    out = [dev]
    for child in dev.get("children") or []:
        out.extend(_walk(child))
    return out


def _loop_serial(name: str) -> str:
    # A loop device has no serial; its backing file's name is what a test can know in advance.
    try:
        backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return ""
    return f"loop:{os.path.basename(backing)}" if backing else ""


def _wipefs_signatures(path: str) -> bool:
    done = _run(["wipefs", "--no-act", "--json", path])
    if done.returncode != 0 or not done.stdout.strip():
        return False
    try:
        return bool(json.loads(done.stdout).get("signatures"))
    except ValueError:
        return True  # unreadable answer: assume there is something to protect


def _boot_medium_serials() -> set[str]:
    """Kernel names given on the command line as the boot medium (`spk.boot_disk=NAME`)."""
    try:
        cmdline = Path("/proc/cmdline").read_text().split()
    except OSError:
        return set()
    return {arg.split("=", 1)[1] for arg in cmdline if arg.startswith("spk.boot_disk=")}


def disk_from_lsblk(dev: dict[str, Any], *, signatures: bool, boot_names: set[str]) -> Disk:
    """One top-level lsblk entry (with children) as a Disk; eligibility left to `judge`."""
    nodes = _walk(dev)
    name = str(dev.get("name") or "")
    kind = str(dev.get("type") or "")
    serial = str(dev.get("serial") or "").strip()
    if kind == "loop":
        serial = _loop_serial(name)
    mounted = any(m for node in nodes for m in (node.get("mountpoints") or []) if m)
    boot = name in boot_names or any(
        node.get("fstype") == "iso9660" and node.get("label") == SHIM_VOLUME_ID for node in nodes
    )
    has_sig = signatures or any(node.get("fstype") or node.get("pttype") for node in nodes)
    return Disk(
        name=name,
        path=str(dev.get("path") or f"/dev/{name}"),
        size=int(dev.get("size") or 0),
        logical_sector=int(dev.get("log-sec") or 512),
        physical_sector=int(dev.get("phy-sec") or 512),
        model=str(dev.get("model") or "").strip(),
        serial=serial,
        wwn=str(dev.get("wwn") or ""),
        transport=str(dev.get("tran") or ""),
        rotational=bool(dev.get("rota")),
        removable=bool(dev.get("rm")),
        read_only=bool(dev.get("ro")),
        has_signatures=bool(has_sig),
        mounted=bool(mounted),
        boot_medium=bool(boot),
        reasons=[f"type_{kind}"] if kind not in ("disk", "loop") else [],
    )


def judge(disk: Disk, dev: dict[str, Any] | None, *, allow_loop: bool) -> Disk:
    """Fill `eligible` and `reasons` (machine-readable) for one disk."""
    reasons = list(disk.reasons)
    if disk.name.startswith(_NEVER):
        reasons.append("ram_or_rom")
    if disk.name.startswith("loop") and not allow_loop:
        reasons.append("loop")
    if disk.read_only:
        reasons.append("read_only")
    if disk.removable:
        reasons.append("removable")
    if disk.boot_medium:
        reasons.append("boot_medium")
    if disk.mounted:
        reasons.append("mounted")
    if disk.size <= 0:
        reasons.append("no_media")
    if not disk.serial:
        reasons.append("no_serial")
    if dev is not None and any(
        str(node.get("type") or "").startswith(_STACKED) for node in _walk(dev)[1:]
    ):
        reasons.append("in_use_by_volume_manager")
    disk.reasons = sorted(set(reasons))
    disk.eligible = not disk.reasons
    return disk


def inventory(*, allow_loop: bool = False, only_serial: str | None = None) -> list[Disk]:
    """Every whole disk the kernel shows, each judged eligible or not (with reasons).

    `wipefs -n` runs only where lsblk saw no partition table or filesystem (it can only
    add one), for all such disks at once, only on disks judged eligible (eligibility does
    not depend on signatures: an ineligible disk's flag would change nothing a plan may
    do), and with `only_serial` (a PLAN names its disk) only on that disk: the others are
    listed for the serial match, their signatures unprobed."""
    done = _run(["lsblk", "-J", "-b", "-o", LSBLK_COLUMNS])
    if done.returncode != 0:
        raise RuntimeError(f"lsblk failed: {done.stderr.strip()}")
    devices = json.loads(done.stdout).get("blockdevices") or []
    boot_names = _boot_medium_serials()
    found: list[tuple[dict[str, Any], Disk]] = []
    probe: list[int] = []
    for dev in devices:
        kind = str(dev.get("type") or "")
        # An unused loop device (no backing file) has size 0 and is just noise.
        if kind == "loop" and not int(dev.get("size") or 0):
            continue
        disk = judge(
            disk_from_lsblk(dev, signatures=False, boot_names=boot_names),
            dev,
            allow_loop=allow_loop,
        )
        wanted = only_serial is None or disk.serial == only_serial
        if kind in ("disk", "loop") and wanted and disk.eligible and not disk.has_signatures:
            probe.append(len(found))
        found.append((dev, disk))
    if probe:
        paths = [found[i][1].path for i in probe]
        with ThreadPoolExecutor(max_workers=min(len(paths), PROBES_AT_ONCE)) as pool:
            for i, signed in zip(probe, pool.map(_wipefs_signatures, paths), strict=True):
                found[i][1].has_signatures = signed
    return [disk for _dev, disk in found]
