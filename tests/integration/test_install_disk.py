"""install/disk.py's steps on their own, for real on loop devices: the wipe, the table
and the kernel's view of it (an old partition in a new one's way), the size check. The
whole preparation through a deploy is in test_deploy_prepare.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spk_visor.install import disk as disk_prep
from spk_visor.install import layout
from spk_visor.install.layout import MIB, PART_NAMES
from tests.support.loopdisk import LoopDisk
from tests.support.prereq import DISK_TOOLS, need_commands, need_root

# Five 64 MiB partitions from 1 MiB: the third (129-193 MiB) lies inside the new ESP
# (2-514 MiB), so when partx adds the new p2 the old p3 is still in its way.
OLD_TABLE = "label: gpt\n" + "size=64MiB, type=L\n" * 5


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[LoopDisk]:
    need_root()
    need_commands(DISK_TOOLS)
    disk = LoopDisk(tmp_path, "2G")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(tmp_path / "old")], capture_output=True, check=False)
        subprocess.run(
            ["partx", "--delete", disk.dev], capture_output=True, timeout=30, check=False
        )
        disk.detach()


def _name(disk: LoopDisk) -> str:
    return os.path.basename(disk.dev)


def _sh(argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout


def _old_table(disk: LoopDisk) -> None:
    _sh(["sfdisk", "--quiet", disk.dev], OLD_TABLE)
    subprocess.run(["partx", "--update", disk.dev], capture_output=True, timeout=30, check=False)
    assert Path(f"/sys/block/{_name(disk)}/{_name(disk)}p5").is_dir()


def _new_table(disk: LoopDisk, *force: str) -> list[tuple[int, int]]:
    """The `ab` table on the disk, the kernel not told; its places as sfdisk reads them."""
    ab = layout.plan(2 << 30, 64 * MIB, MIB)
    argv = ["sfdisk", "--quiet", "--no-tell-kernel", *force, disk.dev]
    _sh(argv, ab.sfdisk_script(_uuids()))
    doc = json.loads(_sh(["sfdisk", "--json", disk.dev]))["partitiontable"]
    return [(int(p["start"]), int(p["size"])) for p in doc["partitions"]]


def _kernel(disk: LoopDisk) -> list[tuple[int, int] | None]:
    """(start, size) of partitions 1-5 as /sys shows them (None: the kernel has none)."""
    out: list[tuple[int, int] | None] = []
    for i in range(1, 6):
        part = Path(f"/sys/block/{_name(disk)}/{_name(disk)}p{i}")
        if part.is_dir():
            out.append((int((part / "start").read_text()), int((part / "size").read_text())))
        else:
            out.append(None)
    return out


def _uuids() -> dict[str, str]:
    return {name: f"{i + 1:08x}-0000-4000-8000-000000000000" for i, name in enumerate(PART_NAMES)}


def test_old_partitions_in_the_way_are_noticed_and_replaced_by_the_new_table(
    loop: LoopDisk,
) -> None:
    _old_table(loop)
    want = _new_table(loop)
    table = disk_prep.read_table(loop.dev, len(PART_NAMES))
    assert table == want
    # Five partitions with the new names, in the old places: not the new table.
    assert not disk_prep.kernel_matches(_name(loop), table)
    disk_prep.reread(loop.dev, _name(loop), table)
    assert _kernel(loop) == want
    assert disk_prep.kernel_matches(_name(loop), table)


def test_a_busy_old_partition_that_keeps_its_place_fails_the_partition_step(
    loop: LoopDisk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old p3, mounted, can be neither dropped nor moved: the kernel never shows the
    new table, and that is the install's error, not a silent success."""
    monkeypatch.setattr(disk_prep, "APPEAR_TIMEOUT_S", 1.0)
    _old_table(loop)
    _sh(["mkfs.ext4", "-q", "-F", loop.part(3)])
    (tmp_path / "old").mkdir()
    _sh(["mount", loop.part(3), str(tmp_path / "old")])
    table = _new_table(loop, "--force")  # sfdisk itself refuses a disk in use
    with pytest.raises(disk_prep.DiskError) as caught:
        disk_prep.reread(loop.dev, _name(loop), table)
    assert caught.value.reason == "partition"
    assert caught.value.detail == f"partitions of {loop.dev} did not appear"
    assert _kernel(loop) != table


def test_the_wipe_leaves_no_partition_no_boot_code_and_no_signature(loop: LoopDisk) -> None:
    _old_table(loop)
    _sh(["mkfs.ext4", "-q", "-F", loop.part(1)])
    with open(loop.dev, "r+b") as f:
        f.write(b"\xeb" * 440)  # boot code
    disk_prep.wipe(loop.dev, _name(loop))
    assert disk_prep.old_partitions(_name(loop)) == []
    with open(loop.dev, "rb") as f:
        head = f.read(MIB)
        f.seek(-MIB, os.SEEK_END)
        tail = f.read(MIB)
        # The old p1's ext4 superblock magic (1 MiB + 1024 + 0x38): outside the zeroed
        # MiB, erased by the old partition's own wipefs.
        f.seek(MIB + 0x438)
        magic = f.read(2)
    assert head == bytes(MIB) and tail == bytes(MIB)
    assert magic == b"\0\0"
    assert json.loads(_sh(["wipefs", "--no-act", "--json", loop.dev]) or '{"signatures": []}') == {
        "signatures": []
    }


def test_partition_names_each_partition_by_the_layout_with_its_guid(loop: LoopDisk) -> None:
    _old_table(loop)
    disk_prep.wipe(loop.dev, _name(loop))
    ab = layout.plan(2 << 30, 64 * MIB, MIB)
    parts = disk_prep.partition(loop.dev, _name(loop), ab, _uuids())
    assert parts == {name: loop.part(i) for i, name in enumerate(PART_NAMES, start=1)}
    assert all(stat.S_ISBLK(os.stat(node).st_mode) for node in parts.values())
    doc = json.loads(_sh(["sfdisk", "--json", loop.dev]))["partitiontable"]
    got = {p["name"]: p["uuid"].lower() for p in doc["partitions"]}
    assert got == _uuids()
    assert disk_prep.kernel_matches(_name(loop), disk_prep.read_table(loop.dev, len(PART_NAMES)))


def test_a_table_with_another_number_of_partitions_is_refused(loop: LoopDisk) -> None:
    _sh(["sfdisk", "--quiet", "--no-tell-kernel", loop.dev], "label: gpt\n" + "size=8MiB\n" * 3)
    with pytest.raises(disk_prep.DiskError) as caught:
        disk_prep.read_table(loop.dev, len(PART_NAMES))
    assert (caught.value.reason, caught.value.detail) == ("partition", "sfdisk wrote 3 partitions")


def test_the_size_check_tells_a_gone_disk_from_a_changed_one(loop: LoopDisk) -> None:
    size = 2 << 30
    disk_prep.check_size(loop.dev, _name(loop), size)
    with pytest.raises(disk_prep.DiskError) as changed:
        disk_prep.check_size(loop.dev, _name(loop), size + 512)
    assert changed.value.reason == "disk_changed"
    assert changed.value.detail == f"{loop.dev} is no longer {size + 512} bytes"
    with pytest.raises(disk_prep.DiskError) as gone:
        disk_prep.check_size("/dev/spk-no-such-disk", "spk-no-such-disk", size)
    assert gone.value.reason == "disk_gone"
    assert gone.value.detail.startswith("/dev/spk-no-such-disk: ")
