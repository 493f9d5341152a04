"""A loop device holding a real GPT disk with A/B root slots, for the base-class tests.

    with ab_disk(tmp_path) as disk:
        disk.root_a, disk.root_b      # "/dev/loop3p2", "/dev/loop3p3"

The partition table is written by sfdisk into a sparse file, which is attached with
`losetup --partscan`. Some kernels are built without GPT partition parsing (this
workplace's is: CONFIG_EFI_PARTITION unset), so the partitions would never appear; then
`partx --add` reads the table in user space and tells the kernel about each partition
(BLKPG), which gives the same /dev/loopNpM nodes. Everything is undone on exit, and a
failure half-way through setup still detaches the loop device.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spk_visor.install import blockdev
from spk_visor.install import disk as disk_prep
from tests.support.loopattach import attach, detach
from tests.support.prereq import need_command, need_root

MIB = 1 << 20
# How long to wait for the kernel (and devtmpfs) to show the partition devices.
APPEAR_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class AbDisk:
    image: Path
    loop: str  # /dev/loopN
    parts: dict[str, str]  # partition name -> /dev/loopNpM

    @property
    def root_a(self) -> str:
        return self.parts["root-a"]

    @property
    def root_b(self) -> str:
        return self.parts["root-b"]

    def backing(self, device: str, offset: int, length: int) -> bytes:
        """Bytes of one of its partitions, read through the loop device's backing file
        (not through the device that wrote them, nor its page cache)."""
        name, loop = os.path.basename(device), os.path.basename(self.loop)
        start = int(Path(f"/sys/block/{loop}/{name}/start").read_text()) * 512
        with self.image.open("rb") as f:
            f.seek(start + offset)
            return f.read(length)


def _run(argv: list[str], stdin: bytes | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode()}")
    return done.stdout.decode()


def _sysfs_parts(loop: str, count: int) -> bool:
    name = os.path.basename(loop)
    return all(Path(f"/sys/block/{name}/{name}p{i}").is_dir() for i in range(1, count + 1))


def need_ab_disk() -> None:
    """Skip (fail under CI) unless ab_disk can run here: root, sfdisk, losetup, partx."""
    need_root()
    need_command("sfdisk", "fdisk")
    need_command("losetup", "util-linux")
    need_command("partx", "util-linux")


@contextlib.contextmanager
def ab_disk(
    directory: Path,
    slot_mib: int = 24,
    esp_mib: int = 2,
    data_mib: int = 0,
    *,
    direct_io: bool = False,
) -> Iterator[AbDisk]:
    """A GPT disk image with [esp,] root-a, root-b [, data] on a partition-scanned loop
    (with `direct_io`, one doing direct I/O to its backing file: tests/support/loopattach)."""
    layout = [("esp", esp_mib), ("root-a", slot_mib), ("root-b", slot_mib), ("data", data_mib)]
    layout = [(name, size) for name, size in layout if size > 0]
    image = directory / "abdisk.img"
    # 1 MiB alignment gap in front and 1 MiB for the backup GPT at the end.
    total = (sum(size for _n, size in layout) + 2) * MIB
    with image.open("wb") as f:
        f.truncate(total)
    script = "label: gpt\n" + "".join(f"size={size}MiB, name={name}\n" for name, size in layout)
    try:
        _run(["sfdisk", "--quiet", str(image)], stdin=script.encode())
        loop = attach(image, partscan=True, direct_io=direct_io)
    except BaseException:
        image.unlink()
        raise
    made: list[str] = []
    try:
        if not disk_prep.wait_until(lambda: _sysfs_parts(loop, len(layout)), 1.0):
            _run(["partx", "--add", loop])
            if not disk_prep.wait_until(lambda: _sysfs_parts(loop, len(layout)), APPEAR_TIMEOUT_S):
                raise RuntimeError(f"partitions of {loop} did not appear")
        parts = {
            name: disk_prep.node(os.path.basename(loop), i, made)
            for i, (name, _s) in enumerate(layout, start=1)
        }
        yield AbDisk(image, loop, parts)
    finally:
        # partx-added partitions go with the loop device, but say so explicitly: a
        # partition left behind would keep the loop device busy.
        subprocess.run(["partx", "--delete", loop], capture_output=True, timeout=30, check=False)
        detach(loop)
        for node in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(node)
        with contextlib.suppress(FileNotFoundError):
            image.unlink()


def fill(device: str, make: Callable[[int], bytes]) -> None:
    """Fill the whole device with make(size), durably: garbage a writer must overwrite."""
    fd = os.open(device, os.O_WRONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        blockdev.pwrite_all(fd, make(size), 0)
        blockdev.flush(fd)
    finally:
        os.close(fd)
