"""Installer.prepare's fixed steps, for real on a loop device: the two mkfs run at once,
the kernel's partitions must match the new table, and a disk deployed twice shows
nothing of the first deploy in its new data filesystem (mkfs.ext4 -E nodiscard)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.deploy.install import Installer, InstallError, validate_plan
from spk_visor.deploy.inventory import Disk, inventory
from spk_visor.install import disk as disk_prep
from spk_visor.install.layout import PART_NAMES
from spk_visor.trust import roots
from tests.support import deploy_images
from tests.support.loopdisk import LoopDisk
from tests.support.prereq import DISK_TOOLS, need_commands, need_root

# How long each wrapped mkfs holds on before running the real one: long enough that two
# run one after the other can never look overlapped, even on a loaded machine.
HOLD_S = 1.0


def _prereqs() -> None:
    need_root()
    need_commands((*DISK_TOOLS, ("blkid", "util-linux")))


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[LoopDisk, Disk, Any]]:
    _prereqs()
    release = deploy_images.release(tmp_path)
    root = roots.load_anchor(release.pki.root_env().to_bytes(), "test root")
    disk = LoopDisk(tmp_path, "2G")
    try:
        found = [d for d in inventory(allow_loop=True) if d.serial == disk.serial]
        assert len(found) == 1, f"inventory does not show {disk.serial}"
        yield disk, found[0], (release, root)
    finally:
        subprocess.run(
            ["umount", "--lazy", str(tmp_path / "mnt")], capture_output=True, check=False
        )
        subprocess.run(
            ["partx", "--delete", disk.dev], capture_output=True, timeout=30, check=False
        )
        disk.detach()


def _installer(tmp: Path, disk: Disk, release_root: Any) -> Installer:
    release, root = release_root
    plan = {
        "manifest": json.loads(release.result.manifest_path.read_bytes()),
        "disk": {"serial": disk.serial, "size": disk.size},
        "layout": "ab",
        "hostname": "node-1",
        "confirm_wipe_serial": disk.serial,
    }
    return Installer(validate_plan(plan, [disk], root), tmp / "mnt", lambda kind, doc: None)


def _wrap(bindir: Path, tool: str, log: Path) -> None:
    """`tool` on PATH as a wrapper: logs its start and end, holds on, runs the real one."""
    real = shutil.which(tool)
    assert real is not None
    script = bindir / tool
    script.write_text(
        "#!/bin/sh\n"
        f'echo "{tool} start $(date +%s.%N)" >> {log}\n'
        f"sleep {HOLD_S}\n"
        f'{real} "$@"\nrc=$?\n'
        f'echo "{tool} end $(date +%s.%N)" >> {log}\n'
        "exit $rc\n"
    )
    script.chmod(0o755)


def test_esp_and_data_filesystems_are_made_at_the_same_time(
    target: tuple[LoopDisk, Disk, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _loop, disk, release_root = target
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "mkfs.log"
    for tool in ("mkfs.vfat", "mkfs.ext4"):
        _wrap(bindir, tool, log)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    inst = _installer(tmp_path, disk, release_root)
    try:
        inst.prepare()
        times: dict[str, float] = {}
        for line in log.read_text().splitlines():
            tool, what, at = line.split()
            times[f"{tool} {what}"] = float(at)
        assert len(times) == 4, log.read_text()
        # Each one started before the other ended: they overlapped.
        assert times["mkfs.vfat start"] < times["mkfs.ext4 end"], times
        assert times["mkfs.ext4 start"] < times["mkfs.vfat end"], times
        kinds = {
            name: subprocess.run(
                ["blkid", "-o", "value", "-s", "TYPE", inst.parts[name]],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout.strip()
            for name in ("esp", "data")
        }
        assert kinds == {"esp": "vfat", "data": "ext4"}
    finally:
        assert inst.abort("test end") == []


def test_a_failing_mkfs_fails_prepare_after_both_ended(
    target: tuple[LoopDisk, Disk, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One mkfs failing is the install's error (reason mkfs, the tool named), whichever
    of the two it is; nothing is mounted."""
    _loop, disk, release_root = target
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mkfs.vfat").write_text("#!/bin/sh\necho 'no space for the FAT' >&2\nexit 1\n")
    (bindir / "mkfs.vfat").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    inst = _installer(tmp_path, disk, release_root)
    try:
        with pytest.raises(InstallError) as caught:
            inst.prepare()
        assert caught.value.reason == "mkfs"
        assert "mkfs.vfat" in caught.value.detail and "no space for the FAT" in caught.value.detail
        assert not inst.state.mounted
    finally:
        inst.abort("test end")


def test_stale_kernel_partitions_are_not_taken_for_the_new_ones(
    target: tuple[LoopDisk, Disk, Any], tmp_path: Path
) -> None:
    """Five kernel partitions with the right names but another table's places are not
    the new layout: only the partitions where the new table puts them count."""
    loop, disk, release_root = target
    other = "label: gpt\n" + "size=64MiB, type=L\n" * 5
    subprocess.run(["sfdisk", "--quiet", loop.dev], input=other, text=True, check=True, timeout=60)
    subprocess.run(["partx", "--update", loop.dev], capture_output=True, timeout=30, check=False)
    inst = _installer(tmp_path, disk, release_root)
    assert Path(f"/sys/block/{disk.name}/{disk.name}p5").is_dir()
    # The new table on the disk, the kernel not told yet: its partitions are the old ones.
    script = inst.plan.layout.sfdisk_script(inst.partuuids)
    subprocess.run(
        ["sfdisk", "--quiet", "--no-tell-kernel", loop.dev],
        input=script,
        text=True,
        check=True,
        timeout=60,
    )
    table = disk_prep.read_table(loop.dev, len(PART_NAMES))
    assert not disk_prep.kernel_matches(disk.name, table)
    try:
        # partx --update alone leaves a gap here (the old p3 overlaps the new p2 when
        # p2's turn comes): what the kernel ends up with must be checked, and retried.
        disk_prep.reread(loop.dev, disk.name, table)
        assert disk_prep.kernel_matches(disk.name, table)
        inst.prepare()
        assert disk_prep.kernel_matches(disk.name, disk_prep.read_table(loop.dev, len(PART_NAMES)))
    finally:
        assert inst.abort("test end") == []


def test_a_second_deploy_shows_nothing_of_the_first_in_the_data_filesystem(
    target: tuple[LoopDisk, Disk, Any], tmp_path: Path
) -> None:
    """mkfs.ext4 runs with -E nodiscard: the old data partition's blocks are not
    discarded, and the new filesystem still shows none of them."""
    _loop, disk, release_root = target
    first = _installer(tmp_path, disk, release_root)
    marker = b"SPK-OLD-DATA-" * 4096
    try:
        first.prepare()
        (tmp_path / "mnt" / "secret").write_bytes(marker)
    finally:
        first.abort("first deploy done")
    disk_now = next(d for d in inventory(allow_loop=True) if d.serial == disk.serial)
    second = _installer(tmp_path, disk_now, release_root)
    try:
        second.prepare()
        mnt = tmp_path / "mnt"
        assert sorted(p.name for p in mnt.iterdir()) == ["lost+found"]
        # Free space is allocated to a new file: it reads back as what was written or
        # zeros, never as the old file's bytes.
        probe = mnt / "probe"
        with probe.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, 64 << 20)
        with probe.open("rb") as f:
            assert not f.read().strip(b"\0")
    finally:
        assert second.abort("test end") == []


def test_the_plan_time_inventory_probes_only_the_planned_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PLAN names its disk: `wipefs -n` runs on that one alone, and still finds a
    signature lsblk does not show."""
    _prereqs()
    planned, other = LoopDisk(tmp_path, "64M"), LoopDisk(tmp_path, "64M")
    try:
        # A filesystem written behind udev's back: lsblk's cached view has no FSTYPE.
        with open(planned.dev, "r+b") as f:
            f.seek(0x438)  # ext2/3/4 superblock magic
            f.write(b"\x53\xef")
        bindir = tmp_path / "bin"
        bindir.mkdir()
        log = tmp_path / "wipefs.log"
        real = shutil.which("wipefs")
        (bindir / "wipefs").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {real} "$@"\n')
        (bindir / "wipefs").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
        disks = inventory(allow_loop=True, only_serial=planned.serial)
        probed = log.read_text().split() if log.exists() else []
        assert planned.dev in probed and other.dev not in probed, probed
        mine = {d.serial: d for d in disks}
        assert other.serial in mine, "every disk is still listed"
        assert mine[planned.serial].has_signatures
    finally:
        planned.detach()
        other.detach()
