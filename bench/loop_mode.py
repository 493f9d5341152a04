"""`--direct-io`, the loop-device mode of the install-path benches (bench.ota_slots,
bench.deploy, bench.writer_ab), defined once here.

Off (the default, so earlier figures stay comparable): the bench's loop device is
buffered, and both the anchor's and the subject's writes and read-backs go through the
backing file's page cache on the host. On: the loop device is attached with `losetup
--direct-io=on` (tests/support/loopattach.py, which fails the bench if the kernel left
DIO off), so the anchor's and the subject's I/O reach the disk under the backing file,
as on a real block device. Anchor and subject always share the one device and its mode;
the output's `loop_direct_io` is read back from the device, not taken from the flag.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tests.support import loopattach

MIB = 1 << 20
T = TypeVar("T")

HELP = (
    "Attach the bench's loop device with losetup --direct-io=on (reads and writes reach "
    "the disk, not the backing file's page cache); fails if the kernel refuses. Default: "
    "buffered, as in earlier figures."
)


def add_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--direct-io", action="store_true", help=HELP)


def figures(dev: str) -> dict[str, object]:
    """The mode the loop device `dev` ran in, for the bench's JSON."""
    return {"loop_device": dev, "loop_direct_io": loopattach.dio(dev)}


@contextlib.contextmanager
def refusal_exits() -> Iterator[None]:
    """A bench asked for --direct-io the kernel did not give: exit 2 with the reason (a
    setup to change, not a bench failure), no traceback."""
    try:
        yield
    except loopattach.DirectIoRefused as e:
        print(f"--direct-io: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def probe(folder: Path) -> None:
    """Attach a tiny throwaway file in `folder` with direct I/O and let it go: a refusal
    (DirectIoRefused) in seconds, before the bench builds its image."""
    with tempfile.NamedTemporaryFile(prefix="direct-io-probe-", dir=folder) as f:
        f.truncate(MIB)
        loopattach.detach(loopattach.attach(Path(f.name), direct_io=True))


def disk_of(
    where: Path | int,
    *,
    sys_root: Path = loopattach.SYS,
    mountinfo: Path = loopattach.MOUNTINFO,
) -> str | None:
    """The whole disk (sysfs name) under the folder `where` (or under a filesystem's
    device number): where a loop file's I/O ends up. A partition counts as its disk, a
    device-mapper volume as itself; None when no block device is behind the folder
    (tmpfs, overlayfs, ZFS)."""
    dev = where if isinstance(where, int) else os.stat(where).st_dev
    found = loopattach.block_device(dev, sys_root=sys_root, mountinfo=mountinfo)
    if found is None:
        return None
    disk = found.parent if (found / "partition").exists() else found
    return disk.name if (sys_root / "block" / disk.name / "stat").is_file() else None


def disk_bytes(disk: str, *, sys_root: Path = loopattach.SYS) -> tuple[int, int]:
    """Bytes read and written by `disk` since boot."""
    fields = (sys_root / "block" / disk / "stat").read_text().split()
    return int(fields[2]) * 512, int(fields[6]) * 512


@dataclass
class HostDisk:
    """MiB the disk under the loop file read and wrote during each timed run: whether a
    read-back came from that disk (direct I/O) or from the backing file's page cache
    (buffered). The disk's counters take in whatever else the machine did meanwhile.
    Without a disk behind the folder (`name` None) the runs just run and both figures
    are null."""

    name: str | None
    sys_root: Path = loopattach.SYS
    moved: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @classmethod
    def under(cls, folder: Path) -> HostDisk:
        return cls(disk_of(folder))

    def around(self, what: str, run: Callable[[], T]) -> T:
        if self.name is None:
            return run()
        r0, w0 = disk_bytes(self.name, sys_root=self.sys_root)
        out = run()
        r1, w1 = disk_bytes(self.name, sys_root=self.sys_root)
        got = self.moved.setdefault(what, {"read_mib": [], "written_mib": []})
        got["read_mib"].append(round((r1 - r0) / MIB, 1))
        got["written_mib"].append(round((w1 - w0) / MIB, 1))
        return out

    def figures(self) -> dict[str, object]:
        return {"host_disk": self.name, "host_disk_mib": self.moved if self.name else None}
