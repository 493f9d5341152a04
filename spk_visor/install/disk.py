"""A whole disk made ready for a new install, in this order and never otherwise:

    check_size        the device behind the name is still the disk that was planned
    wipe              old boot code, both GPT copies and every signature gone
    partition         the layout's GPT written; the kernel's partitions checked against it
    make_filesystems  the ESP (FAT32) and the data filesystem (ext4), at the same time

Each step costs hundredths of a second whatever the disk's size (docs/deploy.md, "What
happens to the disk"): no tool here is left to sleep before re-reading a table, to
`sync()` every disk of the machine, or to discard a whole partition.

A disk is named twice: by its device path (/dev/sda, for the tools) and by its kernel
name (sda, for /sys/block). A step that fails raises DiskError, whose `reason` is
machine-readable (deploy's REPORT carries it).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

from spk_visor.errors import OperatorNeededError
from spk_visor.install import blockdev, runner
from spk_visor.install.layout import DATA_LABEL, ESP_LABEL, MIB, PART_NAMES, Layout

# Every tool here is bounded: mkfs.ext4 of a large disk is the longest of them.
TIMEOUT_S = 600
# How long the kernel may take to show the new partitions after BLKRRPART.
APPEAR_TIMEOUT_S = 10.0
# How long a partition's device node may take to appear (udev, devtmpfs) before it is made.
NODE_TIMEOUT_S = 2.0

# (start, size) of each partition, in the kernel's 512-byte units, in table order.
Table = list[tuple[int, int]]


class DiskError(OperatorNeededError):
    """A step of the preparation failed; `reason` is machine-readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _error(reason: str) -> Callable[[str], DiskError]:
    return functools.partial(DiskError, reason)


def part_name(disk_name: str, index: int) -> str:
    """The kernel name of partition `index`: sda -> sda1; nvme0n1, loop3, mmcblk0 ->
    nvme0n1p1, loop3p1, mmcblk0p1."""
    return f"{disk_name}{'p' if disk_name[-1].isdigit() else ''}{index}"


def check_size(path: str, name: str, size: int) -> None:
    """DiskError("disk_gone") when the kernel has no such disk, ("disk_changed") when it
    is not `size` bytes any more: another device may have taken the name."""
    try:
        sectors = int(Path(f"/sys/class/block/{name}/size").read_text())
    except (OSError, ValueError) as e:
        raise DiskError("disk_gone", f"{path}: {e}") from e
    if sectors * 512 != size:
        raise DiskError("disk_changed", f"{path} is no longer {size} bytes")


def old_partitions(name: str) -> list[str]:
    """Device paths of the partitions the kernel knows on the disk now."""
    base = Path(f"/sys/block/{name}")
    return sorted(f"/dev/{p.name}" for p in base.glob(f"{name}*") if (p / "partition").exists())


def wipe(path: str, name: str) -> None:
    """Old boot code and both GPT copies gone before anything new is written."""
    # Each old partition's signatures, all at once (separate devices); best effort:
    # a partition that cannot be opened is gone with the table below anyway.
    old = [p for p in old_partitions(name) if os.path.exists(p)]
    runner.succeeds_each([["wipefs", "--all", "--quiet", p] for p in old], timeout=TIMEOUT_S)
    # The first and last MiB (MBR boot code, both GPT copies) are zeroed before the
    # whole-disk wipefs: wipefs, when it erases a partition table itself, sleeps
    # 250 ms and re-reads it. It still erases every other signature it finds; the old
    # kernel partitions are dropped below.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            zeros = bytes(MIB)
            blockdev.pwrite_all(fd, zeros, 0)
            blockdev.pwrite_all(fd, zeros, max(size - MIB, 0))
            blockdev.flush(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise DiskError("wipe", f"{path}: {e}") from e
    runner.run_checked(["wipefs", "--all", "--quiet", path], _error("wipe"), timeout=TIMEOUT_S)
    # Kernel partitions of the old table would otherwise linger (and keep names busy).
    runner.succeeds(["partx", "--delete", path], timeout=TIMEOUT_S)


def read_table(path: str, count: int) -> Table:
    """The table on the disk (sfdisk --json), in the kernel's units; DiskError
    ("partition") unless it has exactly `count` partitions."""
    out = runner.run_checked(["sfdisk", "--json", path], _error("partition"), timeout=TIMEOUT_S)
    try:
        doc = json.loads(out)["partitiontable"]
        unit = int(doc.get("sectorsize", 512)) // 512
        table = [(int(p["start"]) * unit, int(p["size"]) * unit) for p in doc["partitions"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DiskError("partition", f"sfdisk --json: {e}") from e
    if len(table) != count:
        raise DiskError("partition", f"sfdisk wrote {len(table)} partitions")
    return table


def kernel_matches(name: str, table: Table) -> bool:
    """Every partition of `table` is in the kernel, where the table puts it: a partition
    of the old table that could not be dropped has the name but not the place."""
    if not table:
        return False
    base = Path(f"/sys/block/{name}")
    for i, want in enumerate(table, start=1):
        part = base / part_name(name, i)
        try:
            got = (int((part / "start").read_text()), int((part / "size").read_text()))
        except (OSError, ValueError):
            return False
        if got != want:
            return False
    return True


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    """Whether `cond()` came true within `timeout` seconds (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def reread(path: str, name: str, table: Table) -> None:
    """Tell the kernel about the new table: `partx --update` (BLKPG, partition by
    partition: works where the kernel has no GPT parser, and does not wait), a second
    time where an old partition the wipe could not drop was in a new one's way when the
    first run came to it (partx then exits 0 and leaves the new one out), then BLKRRPART.
    DiskError("partition") when the kernel still does not show `table`. partprobe would
    also run dmidecode and `udevadm settle` twice, a quarter of a second."""

    def updated() -> bool:
        partx = ["partx", "--update", path]
        return runner.succeeds(partx, timeout=TIMEOUT_S) and kernel_matches(name, table)

    if not (updated() or updated()):
        runner.succeeds(["blockdev", "--rereadpt", path], timeout=TIMEOUT_S)
        if not wait_until(lambda: kernel_matches(name, table), APPEAR_TIMEOUT_S):
            raise DiskError("partition", f"partitions of {path} did not appear")
    if shutil.which("udevadm"):
        runner.succeeds(["udevadm", "settle", "--timeout=10"], timeout=TIMEOUT_S)


def node(name: str, index: int, made: list[str] | None = None) -> str:
    """The partition's device node; made by hand (and added to `made`) where no
    udev/devtmpfs made it."""
    part = part_name(name, index)
    path = f"/dev/{part}"
    if wait_until(lambda: os.path.exists(path), NODE_TIMEOUT_S):
        return path
    major, minor = Path(f"/sys/block/{name}/{part}/dev").read_text().split(":")
    os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(int(major), int(minor)))
    if made is not None:
        made.append(path)
    return path


def partition(path: str, name: str, layout: Layout, partuuids: dict[str, str]) -> dict[str, str]:
    """The layout's GPT on the disk and in the kernel; the device node of each partition
    by its layout name. DiskError("partition")."""
    # --no-tell-kernel: sfdisk would sleep 250 ms, then sync() every disk of the
    # machine, before its BLKRRPART; reread tells the kernel instead. The table itself
    # is fsynced by sfdisk either way.
    runner.run_checked(
        [
            "sfdisk",
            "--quiet",
            "--no-tell-kernel",
            "--wipe",
            "always",
            "--wipe-partitions",
            "always",
            path,
        ],
        _error("partition"),
        timeout=TIMEOUT_S,
        stdin=layout.sfdisk_script(partuuids),
    )
    reread(path, name, read_table(path, len(PART_NAMES)))
    return {part: node(name, i) for i, part in enumerate(PART_NAMES, start=1)}


def make_filesystems(esp: str, esp_volume_id: str, data: str, data_uuid: str) -> None:
    """Both filesystems at once: different partitions, no shared state. DiskError
    ("mkfs") naming the tool, once both have ended. `esp_volume_id` is 8 hex digits
    (shown as XXXX-XXXX).

    mkfs.ext4 -E nodiscard: its default discard of the whole data partition is most
    of its time (seconds on a large disk), and it changes nothing the new filesystem
    shows. ext4 never exposes a block it has not allocated: a file's new blocks are
    written, or flagged unwritten and read as zeros, before anything reads them;
    block groups with unused inode tables are flagged uninitialised (their stale
    contents are never parsed) and zeroed by the kernel's lazy init; mke2fs zeroes
    the journal itself. The discard would matter to the inode tables' zeroing only
    where the device reports that discarded blocks read as zeros, which Linux no
    longer reports (BLKDISCARDZEROES is 0): they are zeroed either way. Old data in
    free blocks stays readable only through the raw device, as before the deploy.
    What is lost is the TRIM of the free space on an SSD at install time (`fstrim
    /data` on the node does it)."""
    runner.run_all(
        [
            ["mkfs.vfat", "-F", "32", "-n", ESP_LABEL, "-i", esp_volume_id, esp],
            ["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-L", DATA_LABEL, "-U", data_uuid, data],
        ],
        _error("mkfs"),
        timeout=TIMEOUT_S,
    )
