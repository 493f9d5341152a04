"""The disk under a bench's loop file (bench/loop_mode.py: disk_of, disk_bytes, HostDisk):
found through sysfs from the folder's device, a partition counted as its disk, and no
disk at all (tmpfs, overlayfs, ZFS: an anonymous device) reported as null instead of
failing the bench at its first timed run."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bench import loop_mode
from tests.support.prereq import need_root

MIB = 1 << 20


def _fake_sys(root: Path, numbers: str, device: str, *, partition_of: str | None = None) -> Path:
    """A /sys with one block device `device` (a partition of `partition_of` if given)
    whose numbers are `numbers`, and /sys/block/<disk>/stat for its disk."""
    disk = partition_of or device
    disk_dir = root / "devices" / "pci0000:00" / "virtio" / "block" / disk
    own = disk_dir / device if partition_of else disk_dir
    own.mkdir(parents=True)
    if partition_of:
        (own / "partition").write_text("1\n")
    (disk_dir / "stat").write_text(_stat(0, 0))
    (root / "dev" / "block").mkdir(parents=True)
    (root / "dev" / "block" / numbers).symlink_to(own)
    (root / "block").mkdir()
    (root / "block" / disk).symlink_to(disk_dir)
    return root


def _stat(read_sectors: int, written_sectors: int) -> str:
    # /sys/block/<disk>/stat: field 3 sectors read, field 7 sectors written (512 bytes).
    return f"100 0 {read_sectors} 5 200 0 {written_sectors} 7 0 9 12 0 0 0 0 0 0\n"


def test_a_partition_counts_as_its_disk(tmp_path: Path) -> None:
    sys_root = _fake_sys(tmp_path, "253:1", "vda1", partition_of="vda")
    assert loop_mode.disk_of(os.makedev(253, 1), sys_root=sys_root) == "vda"


def test_a_device_mapper_volume_is_its_own_disk(tmp_path: Path) -> None:
    sys_root = tmp_path
    dm = sys_root / "devices" / "virtual" / "block" / "dm-0"
    dm.mkdir(parents=True)
    (dm / "stat").write_text(_stat(0, 0))
    (sys_root / "dev" / "block").mkdir(parents=True)
    (sys_root / "dev" / "block" / "254:0").symlink_to(dm)
    (sys_root / "block").mkdir()
    (sys_root / "block" / "dm-0").symlink_to(dm)
    assert loop_mode.disk_of(os.makedev(254, 0), sys_root=sys_root) == "dm-0"


def test_disk_bytes_are_the_sectors_moved_times_512(tmp_path: Path) -> None:
    sys_root = _fake_sys(tmp_path, "253:0", "vda")
    (sys_root / "block" / "vda" / "stat").write_text(_stat(2048, 4096))
    assert loop_mode.disk_bytes("vda", sys_root=sys_root) == (MIB, 2 * MIB)


def test_host_disk_counts_what_its_disk_moved_during_each_run(tmp_path: Path) -> None:
    sys_root = _fake_sys(tmp_path, "253:0", "vda")
    counters = sys_root / "block" / "vda" / "stat"
    host = loop_mode.HostDisk("vda", sys_root=sys_root)

    def run() -> str:
        counters.write_text(_stat(3 * 2048, 2048))
        return "done"

    assert host.around("stage", run) == "done"
    assert host.figures() == {
        "host_disk": "vda",
        "host_disk_mib": {"stage": {"read_mib": [3.0], "written_mib": [1.0]}},
    }


def test_a_folder_on_tmpfs_has_no_disk_and_the_bench_still_runs() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.major(shm.stat().st_dev) != 0:
        pytest.skip("/dev/shm is not a tmpfs here")
    assert loop_mode.disk_of(shm) is None
    host = loop_mode.HostDisk.under(shm)
    assert host.around("stage", lambda: 7) == 7
    assert host.figures() == {"host_disk": None, "host_disk_mib": None}


def test_the_root_folder_of_this_machine_has_a_disk_with_counters() -> None:
    disk = loop_mode.disk_of(Path("/"))
    if disk is None:
        pytest.skip("/ is not on a block device here (container overlay)")
    read, written = loop_mode.disk_bytes(disk)
    assert read >= 0 and written >= 0


def test_an_anonymous_device_names_its_disk_in_the_mount_source(tmp_path: Path) -> None:
    # btrfs reports an anonymous device (major 0) for its files; its mount's source is
    # the block device, which is the disk.
    need_root()
    sys_root = _fake_sys(tmp_path / "sys", "253:2", "vda2", partition_of="vda")
    node = tmp_path / "vda2"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(253, 2))
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:27 / /srv rw,relatime shared:1 - tmpfs tmpfs rw\n"
        f"23 1 0:31 / /data rw,relatime shared:2 - btrfs {node} rw,space_cache=v2\n"
    )
    kw = {"sys_root": sys_root, "mountinfo": mountinfo}
    assert loop_mode.disk_of(os.makedev(0, 31), **kw) == "vda"
    assert loop_mode.disk_of(os.makedev(0, 27), **kw) is None
    assert loop_mode.disk_of(os.makedev(0, 99), **kw) is None
