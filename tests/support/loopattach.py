"""Attach a file to a loop device, buffered (the default) or with direct I/O.

    dev = attach(image, partscan=True, direct_io=True)   # "/dev/loop3", DIO=1 checked

Where the benches (bench/ota_slots.py, bench/deploy.py, bench/writer_ab.py) and the
tests built on tests/support/abdisk.py and tests/support/loopdisk.py run `losetup` to
attach. (A few integration tests that only need a buffered scratch disk still run
`losetup` themselves.) A buffered loop device writes and reads its backing file through
that file's page cache, so a write's read-back is served from memory and an O_DIRECT
write on the loop device still lands in the host's page cache first. With
`--direct-io=on` the loop worker opens the backing file O_DIRECT: reads and writes reach
the disk under it.

The kernel may turn direct I/O down without an error (losetup exits 0 and DIO stays 0):
when the backing file's filesystem does not do O_DIRECT (tmpfs before Linux 6.6), or
when the disk under it has logical blocks larger than the loop device's sectors. These
loop disks are laid out in 512-byte sectors (their GPT is written by sfdisk into the
file), so attach() asks for 512-byte sectors; on a disk with 4 KiB logical blocks a
newer kernel would otherwise give the direct-I/O device 4 KiB sectors, and the GPT would
not be found. A bench that asked for direct I/O would then measure the buffered path
under the wrong name (or fail half-way), so attach() reads DIO back (`losetup -l -O
DIO`), and if it is not 1 it detaches and raises DirectIoRefused with the reason.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

SYS = Path("/sys")
MOUNTINFO = Path("/proc/self/mountinfo")
# The sector size these loop disks' partition tables are written in (sfdisk on a file).
SECTOR = 512


class DirectIoRefused(RuntimeError):
    """The kernel attached the file but left direct I/O off."""


def _losetup(argv: list[str]) -> str:
    done = subprocess.run(
        ["losetup", *argv], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"losetup {' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def dio(dev: str) -> bool:
    """Whether the loop device `dev` does direct I/O to its backing file now."""
    return _losetup(["--list", "--noheadings", "--output", "DIO", dev]).strip() == "1"


def block_device(dev: int, *, sys_root: Path = SYS, mountinfo: Path = MOUNTINFO) -> Path | None:
    """The sysfs folder of the block device a filesystem with device number `dev` (a
    file's st_dev) lives on: a partition's own folder for a partition. None when there
    is none: tmpfs, overlayfs, ZFS and network filesystems have an anonymous device
    (major 0) and no disk of their own. btrfs also reports an anonymous device, but its
    mount's source is the block device, so that one is taken."""
    numbers: str | None = f"{os.major(dev)}:{os.minor(dev)}"
    if os.major(dev) == 0:
        numbers = _mount_source(f"0:{os.minor(dev)}", mountinfo)
    if numbers is None:
        return None
    link = sys_root / "dev" / "block" / numbers
    return link.resolve() if link.exists() else None


def _mount_source(numbers: str, mountinfo: Path) -> str | None:
    """major:minor of the block device named as the source of the mount whose device is
    `numbers` (proc(5) mountinfo: field 3, and the second field after " - ")."""
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[2] != numbers or "-" not in fields[6:]:
            continue
        source = fields[fields.index("-", 6) + 2]
        try:
            st = os.stat(source)
        except OSError:
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return None


def backing_block_size(path: Path) -> int | None:
    """Logical block size of the disk under `path`'s filesystem, if it has one."""
    found = block_device(os.stat(path).st_dev)
    if found is None:
        return None
    # A partition has no queue of its own: its disk's is the one.
    for candidate in (found / "queue", found.parent / "queue"):
        size = candidate / "logical_block_size"
        if size.is_file():
            return int(size.read_text())
    return None


def o_direct_ok(folder: Path) -> bool:
    """Whether files in `folder` can be opened O_DIRECT (a loop device's direct I/O
    needs it of its backing file's filesystem)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".o-direct-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    try:
        os.close(os.open(name, os.O_RDWR | os.O_DIRECT))
    except OSError:
        return False
    finally:
        os.unlink(name)
    return True


def refusal(backing: Path, dev: str) -> str:
    """Why the kernel left direct I/O off on `dev` for `backing`, and what to do."""
    said = f"losetup --direct-io=on {backing}: the kernel left direct I/O off on {dev}"
    fix = "put the work folder (TMPDIR) on another filesystem, or run without --direct-io"
    if not o_direct_ok(backing.parent):
        return (
            f"{said}: the filesystem of {backing.parent} does not do O_DIRECT (tmpfs "
            f"before Linux 6.6, for one); {fix}."
        )
    block = backing_block_size(backing)
    if block is not None and block > SECTOR:
        return (
            f"{said}: the disk under {backing.parent} has {block}-byte logical blocks, "
            f"and direct I/O to it needs loop sectors at least that large, while these "
            f"loop disks are laid out in {SECTOR}-byte sectors (their GPT is written into "
            f"the file in {SECTOR}-byte sectors); {fix}."
        )
    return f"{said} (losetup -l -O NAME,DIO shows DIO 0, cause unknown); {fix}."


def detach(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30, check=False)


def attach(
    backing: Path, *, partscan: bool = False, direct_io: bool = False, sector: int | None = None
) -> str:
    """Attach `backing` to a free loop device; its path. With `direct_io`, the device
    does direct I/O to the file or this raises DirectIoRefused (nothing left attached).
    `sector`: the device's sector size (with `direct_io`, 512 unless given)."""
    argv = ["--find", "--show"]
    if partscan:
        argv.append("--partscan")
    if direct_io:
        argv.append("--direct-io=on")
        # Without it a newer kernel gives a direct-I/O device on a 4 KiB-block disk
        # 4 KiB sectors (and the 512-byte GPT is not found); with it, it leaves DIO off.
        sector = sector or SECTOR
    if sector is not None:
        argv += ["--sector-size", str(sector)]
    dev = _losetup([*argv, str(backing)]).strip()
    if direct_io:
        try:
            on = dio(dev)
        except BaseException:
            detach(dev)
            raise
        if not on:
            detach(dev)
            raise DirectIoRefused(refusal(backing, dev))
    return dev
