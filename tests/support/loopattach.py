"""Attach a file to a loop device, buffered (the default) or with direct I/O.

    dev = attach(image, partscan=True, direct_io=True)   # "/dev/loop3", DIO=1 checked

The one place the tests and the benches (bench/ota_slots.py, bench/deploy.py,
bench/writer_ab.py, through tests/support/abdisk.py and tests/support/loopdisk.py) run
`losetup` to attach. A buffered loop device writes and reads its backing file through
that file's page cache, so a write's read-back is served from memory and an O_DIRECT
write on the loop device still lands in the host's page cache first. With
`--direct-io=on` the loop worker opens the backing file O_DIRECT: reads and writes reach
the disk under it.

The kernel may turn direct I/O down without an error (losetup exits 0 and DIO stays 0):
when the backing filesystem does not do O_DIRECT, or the loop device's sector size
(512) is smaller than the logical block size of the disk under the backing file. A bench
that asked for it would then measure the buffered path under the wrong name, so attach()
reads DIO back (`losetup -l -O DIO`), and if it is not 1 it detaches and raises
DirectIoRefused.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


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


def backing_block_size(path: Path) -> int | None:
    """Logical block size of the disk under `path`'s filesystem, if it has one."""
    dev = os.stat(path).st_dev
    queue = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for candidate in (queue / "queue", queue.resolve().parent / "queue"):
        size = candidate / "logical_block_size"
        if size.is_file():
            return int(size.read_text())
    return None


def detach(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30, check=False)


def attach(backing: Path, *, partscan: bool = False, direct_io: bool = False) -> str:
    """Attach `backing` to a free loop device; its path. With `direct_io`, the device
    does direct I/O to the file or this raises DirectIoRefused (nothing left attached)."""
    argv = ["--find", "--show"]
    if partscan:
        argv.append("--partscan")
    if direct_io:
        argv.append("--direct-io=on")
    dev = _losetup([*argv, str(backing)]).strip()
    if direct_io:
        try:
            on = dio(dev)
        except BaseException:
            detach(dev)
            raise
        if not on:
            detach(dev)
            block = backing_block_size(backing)
            raise DirectIoRefused(
                f"losetup --direct-io=on {backing}: the kernel left direct I/O off on {dev} "
                f"(losetup -l -O NAME,DIO shows DIO 0). The backing file's filesystem must "
                f"do O_DIRECT and the loop device's 512-byte sectors must be at least the "
                f"logical block size of the disk under it ({block or 'unknown'} bytes); put "
                f"the work folder (TMPDIR) on such a filesystem, or run without --direct-io."
            )
    return dev
