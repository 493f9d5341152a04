"""The benches' loop devices in each mode, for real (root, losetup): with direct_io the
kernel reports DIO=1 and what is written through the device reaches the backing file
without passing through its page cache; without it, DIO=0 and the written range sits in
the backing file's page cache, as the buffered figures assume.

(tests/unit/test_bench_direct_io.py: the option from each bench's command line to here.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import loop_mode
from spk_visor.install import blockdev
from tests.support import loopattach
from tests.support.abdisk import ab_disk, need_ab_disk
from tests.support.loopdisk import LoopDisk
from tests.support.prereq import need_command

MIB = 1 << 20
WRITE = 4 * MIB


def _sysfs_dio(dev: str) -> str:
    return Path(f"/sys/block/{os.path.basename(dev)}/loop/dio").read_text().strip()


def _cached_share(path: Path, offset: int, length: int) -> float:
    """Share of [offset, offset + length) of `path` in the host's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = blockdev.cached_pages(fd, offset + length)
    finally:
        os.close(fd)
    window = pages[offset // blockdev.PAGE :]
    return window.count(1) / len(window)


def _refused_skips(exc: loopattach.DirectIoRefused) -> None:
    pytest.skip(f"this machine's disk cannot back a DIO loop device: {exc}")


@pytest.fixture
def dio_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder whose files open O_DIRECT, as a DIO loop device's backing file must:
    pytest's tmp_path, or (tmpfs /tmp before Linux 6.6) a private one under /var/tmp."""
    if loopattach.o_direct_ok(tmp_path):
        yield tmp_path
        return
    private = Path(tempfile.mkdtemp(prefix="spk-dio-", dir="/var/tmp"))
    try:
        if not loopattach.o_direct_ok(private):
            pytest.skip(f"neither {tmp_path} nor /var/tmp can be opened O_DIRECT here")
        yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "buffered"])
def test_an_ab_disk_in_each_mode_says_so_and_writes_past_the_page_cache_only_with_dio(
    dio_folder: Path, direct: bool
) -> None:
    need_ab_disk()
    with contextlib.ExitStack() as stack:
        try:
            d = stack.enter_context(ab_disk(dio_folder, slot_mib=8, esp_mib=1, direct_io=direct))
        except loopattach.DirectIoRefused as e:
            _refused_skips(e)
        assert loopattach.dio(d.loop) is direct
        assert _sysfs_dio(d.loop) == ("1" if direct else "0")
        data = blockdev.Buffer(WRITE)
        data.view[:] = os.urandom(WRITE)
        fd, o_direct = blockdev.open_for_writing(d.root_b)
        try:
            assert o_direct
            blockdev.pwrite_all(fd, data.view, 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        name = os.path.basename(d.root_b)
        start = int(Path(f"/sys/block/{os.path.basename(d.loop)}/{name}/start").read_text())
        share = _cached_share(d.image, start * 512, WRITE)
        if direct:
            assert share == 0.0, f"{share:.0%} of the written range went through the page cache"
        else:
            assert share == 1.0, f"only {share:.0%} of the written range is in the page cache"
        assert d.backing(d.root_b, 0, WRITE) == bytes(data.view)
    assert not d.image.exists()


def test_a_deploy_target_disk_with_direct_io_says_so(dio_folder: Path) -> None:
    need_ab_disk()
    try:
        disk = LoopDisk(dio_folder, "64M", direct_io=True)
    except loopattach.DirectIoRefused as e:
        _refused_skips(e)
    try:
        assert loopattach.dio(disk.dev)
        assert _sysfs_dio(disk.dev) == "1"
    finally:
        disk.detach()
        disk.file.unlink()
    buffered = LoopDisk(dio_folder, "64M")
    try:
        assert not loopattach.dio(buffered.dev)
    finally:
        buffered.detach()
        buffered.file.unlink()


def test_a_disk_with_4k_blocks_refuses_direct_io_with_the_reason(dio_folder: Path) -> None:
    # The disk under the backing file is itself a loop device with 4 KiB sectors, holding
    # ext4. Direct I/O to it needs loop sectors of 4 KiB, which the 512-byte GPT of an
    # ab_disk cannot have: a refusal that says so (the bench exits 2), not a traceback.
    need_ab_disk()
    need_command("mkfs.ext4", "e2fsprogs")
    need_command("mount", "mount")
    outer = dio_folder / "outer.img"
    with outer.open("wb") as f:
        f.truncate(64 * MIB)
    mnt = dio_folder / "mnt"
    mnt.mkdir()
    dev = loopattach.attach(outer, sector=4096)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-b", "4096", dev], check=True, timeout=60)
        subprocess.run(["mount", dev, str(mnt)], check=True, timeout=30)
        try:
            with pytest.raises(loopattach.DirectIoRefused, match="4096-byte logical blocks"):
                loop_mode.probe(mnt)
            with (
                pytest.raises(loopattach.DirectIoRefused, match="512-byte sectors"),
                ab_disk(mnt, slot_mib=2, esp_mib=1, direct_io=True),
            ):
                pass
            assert sorted(p.name for p in mnt.iterdir()) == ["lost+found"]
        finally:
            subprocess.run(["umount", str(mnt)], check=False, timeout=30)
    finally:
        loopattach.detach(dev)
        outer.unlink()
        mnt.rmdir()
