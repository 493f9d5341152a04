"""GET /api/pci: every PCI device, its IOMMU group, and whether passthrough is viable.

A device is viable when it has an IOMMU group and no device in that group is host-critical:
vfio needs the whole group, so passing through a sibling of the root disk's controller
takes the root disk with it. Host-critical means it carries the root filesystem or the
management network (the default route's interface), found through sysfs the way udev
would: block device or network interface -> its sysfs directory -> the nearest PCI address
on that path. Stacked devices are followed down (dm/md ``slaves/``, bridge/bond/VLAN
``lower_*``), so a root on LVM or an address on a Linux bridge still protects the hardware
under it.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from smechvisord.host import BDF_RE, Host, HostError

DEVICES_DIR = "/sys/bus/pci/devices"

# Class 0x0604. vfio-pci refuses to bind bridges (non-normal header) and the kernel lets
# them stay in a group whose other devices are passed through.
PCI_BRIDGE_CLASS = 0x0604

# How deep to follow stacked block/net devices (LVM on RAID on ..., VLAN on bond on ...).
MAX_STACK_DEPTH = 8

# Names as lspci prints them: (base class, subclass) first, then the base class alone.
CLASS_NAMES: dict[tuple[int, int | None], str] = {
    (0x00, None): "Unclassified device",
    (0x01, 0x00): "SCSI storage controller",
    (0x01, 0x01): "IDE interface",
    (0x01, 0x04): "RAID bus controller",
    (0x01, 0x06): "SATA controller",
    (0x01, 0x07): "Serial Attached SCSI controller",
    (0x01, 0x08): "Non-Volatile memory controller",
    (0x01, None): "Mass storage controller",
    (0x02, 0x00): "Ethernet controller",
    (0x02, None): "Network controller",
    (0x03, 0x00): "VGA compatible controller",
    (0x03, 0x02): "3D controller",
    (0x03, None): "Display controller",
    (0x04, 0x01): "Multimedia audio controller",
    (0x04, 0x03): "Audio device",
    (0x04, None): "Multimedia controller",
    (0x05, None): "Memory controller",
    (0x06, 0x00): "Host bridge",
    (0x06, 0x01): "ISA bridge",
    (0x06, 0x04): "PCI bridge",
    (0x06, None): "Bridge",
    (0x07, None): "Communication controller",
    (0x08, 0x06): "IOMMU",
    (0x08, None): "System peripheral",
    (0x09, None): "Input device controller",
    (0x0C, 0x03): "USB controller",
    (0x0C, 0x05): "SMBus",
    (0x0C, None): "Serial bus controller",
    (0x0D, None): "Wireless controller",
    (0x10, None): "Encryption controller",
    (0x11, None): "Signal processing controller",
    (0x12, None): "Processing accelerators",
    (0xFF, None): "Unassigned class",
}

# Interface names the kernel allows: no "/", at most 15 bytes (IFNAMSIZ - 1).
_IFACE_RE = re.compile(r"[^/\s\x00]{1,15}")


def class_name(class_id: str) -> str:
    """Human name of a 6-hex-digit class code ("010802" -> "Non-Volatile memory controller")."""
    base, sub = int(class_id[0:2], 16), int(class_id[2:4], 16)
    return CLASS_NAMES.get((base, sub)) or CLASS_NAMES.get((base, None)) or f"Class {class_id[:4]}"


def _hex_attr(host: Host, device_dir: PurePosixPath, name: str, digits: int) -> str:
    """A sysfs hex attribute ("0x8086\\n") as bare lower-case digits ("8086")."""
    raw = host.read_text(device_dir / name, limit=64).strip().lower().removeprefix("0x")
    if len(raw) != digits or not all(c in "0123456789abcdef" for c in raw):
        raise HostError(f"{device_dir / name}: expected {digits} hex digits, got {raw!r}")
    return raw


def _nearest_bdf(path: PurePosixPath) -> str | None:
    """The last PCI address on a sysfs path: the device itself, not the bridges above it."""
    found = [part for part in path.parts if BDF_RE.fullmatch(part)]
    return found[-1] if found else None


def _block_bdfs(host: Host, block_dir: PurePosixPath, depth: int = 0) -> set[str]:
    """PCI devices under a block device: its own, or those of its dm/md ``slaves``."""
    bdf = _nearest_bdf(block_dir)
    if bdf:
        return {bdf}
    found: set[str] = set()
    if depth < MAX_STACK_DEPTH:
        for slave in host.listdir(block_dir / "slaves"):
            found |= _block_bdfs(host, host.resolve(block_dir / "slaves" / slave), depth + 1)
    return found


def _net_bdfs(host: Host, net_dir: PurePosixPath, depth: int = 0) -> set[str]:
    """PCI devices under an interface: its ``device``, or those of its ``lower_*`` ports."""
    if host.exists(net_dir / "device"):
        bdf = _nearest_bdf(host.resolve(net_dir / "device"))
        return {bdf} if bdf else set()
    found: set[str] = set()
    if depth < MAX_STACK_DEPTH:
        for entry in host.listdir(net_dir):
            if entry.startswith("lower_"):
                found |= _net_bdfs(host, host.resolve(net_dir / entry), depth + 1)
    return found


def _root_block_name(host: Host) -> str | None:
    """Kernel name of the block device mounted on / ("nvme0n1p2", "dm-0"), None if none."""
    source = host.root_source()
    if source == "/dev/root":
        # /dev/root is the kernel's alias for root=; the command line says which device.
        source = _cmdline_root(host.cmdline())
    if not source or not source.startswith("/dev/"):
        return None  # tmpfs, overlay, nfs, zfs datasets: no block device of their own
    # /dev/mapper/vg-root and /dev/disk/by-*/ are links to the kernel's name (../dm-0).
    return host.resolve(source).name or None


def _cmdline_root(cmdline: list[str]) -> str | None:
    spec = next((t.removeprefix("root=") for t in reversed(cmdline) if t.startswith("root=")), "")
    for prefix, directory in (("UUID=", "by-uuid"), ("PARTUUID=", "by-partuuid")):
        if spec.startswith(prefix):
            return f"/dev/disk/{directory}/{spec.removeprefix(prefix)}"
    return spec or None


def host_critical(host: Host) -> dict[str, str]:
    """PCI address -> why the host cannot give it away. Raises HostError when the facts
    needed to decide (/proc/mounts, /proc/net/route) are missing: guessing would be unsafe.
    """
    reasons: dict[str, list[str]] = {}
    root = _root_block_name(host)
    if root and "/" not in root:
        for bdf in _block_bdfs(host, host.resolve(f"/sys/class/block/{root}")):
            reasons.setdefault(bdf, []).append("carries the root filesystem")
    for iface in host.default_route_interfaces():
        if not _IFACE_RE.fullmatch(iface) or iface in (".", ".."):
            continue
        for bdf in _net_bdfs(host, host.resolve(f"/sys/class/net/{iface}")):
            reasons.setdefault(bdf, []).append(f"carries the management network {iface}")
    return {bdf: "; ".join(why) for bdf, why in reasons.items()}


def _is_bridge(class_id: str) -> bool:
    return int(class_id[:4], 16) == PCI_BRIDGE_CLASS


def _describe(host: Host, address: str) -> dict[str, object]:
    """The facts of one device that need no other device: ids, class, driver, group."""
    device_dir = host.resolve(f"{DEVICES_DIR}/{address}")
    class_id = _hex_attr(host, device_dir, "class", 6)
    group = host.link_name(device_dir / "iommu_group")
    return {
        "address": address,
        "vendor_id": _hex_attr(host, device_dir, "vendor", 4),
        "device_id": _hex_attr(host, device_dir, "device", 4),
        "class_id": class_id,
        "class_name": class_name(class_id),
        "driver": host.link_name(device_dir / "driver"),
        "iommu_group": int(group) if group and group.isdigit() else None,
    }


def _verdict(
    device: dict[str, object],
    members: list[str],
    classes: dict[str, str],
    critical: dict[str, str],
) -> list[str]:
    """Sentences saying why passthrough of ``device`` is not possible; [] when it is."""
    address, group = str(device["address"]), device["iommu_group"]
    reasons: list[str] = []
    if group is None:
        reasons.append(
            "it has no IOMMU group: enable VT-d / AMD-Vi in firmware setup and "
            "intel_iommu=on or amd_iommu=on on the kernel command line"
        )
    if _is_bridge(str(device["class_id"])):
        reasons.append("it is a PCI bridge: vfio-pci does not bind bridges")
    if address in critical:
        reasons.append(f"it {critical[address]}")
    for member in members:
        # Bridges in a group stay with the host and do not block the group.
        if member != address and member in critical and not _is_bridge(classes.get(member, "")):
            reasons.append(f"IOMMU group {group} also holds {member}, which {critical[member]}")
    return reasons


def list_devices(host: Host) -> list[dict[str, object]]:
    """GET /api/pci: every device, sorted by address. Raises HostError on an unreadable
    attribute or when /proc/mounts or /proc/net/route is missing.
    """
    described = []
    for address in (a for a in host.listdir(DEVICES_DIR) if BDF_RE.fullmatch(a)):
        try:
            described.append(_describe(host, address))
        except HostError as exc:
            raise HostError(f"PCI device {address}: {exc}") from exc
    classes = {str(d["address"]): str(d["class_id"]) for d in described}
    groups = host.iommu_groups()
    critical = host_critical(host)
    for device in described:
        group = device["iommu_group"]
        # A group link whose group directory is missing still holds the device itself.
        members = (groups.get(group) or [str(device["address"])]) if isinstance(group, int) else []
        reasons = _verdict(device, members, classes, critical)
        device["group_devices"] = members
        device["host_critical"] = critical.get(str(device["address"]))
        device["viable"] = not reasons
        device["reasons"] = reasons
    return described


def pci_device(host: Host, address: str) -> dict[str, object] | None:
    """One device of list_devices, None when there is no such address (or it is malformed)."""
    if not BDF_RE.fullmatch(address):
        return None
    return next((d for d in list_devices(host) if d["address"] == address), None)
