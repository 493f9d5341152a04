"""The benches' loop devices in each mode, for real (root, losetup): with direct_io the
kernel reports DIO=1 and what is written through the device reaches the backing file
without passing through its page cache; without it, DIO=0 and the written range sits in
the backing file's page cache, as the buffered figures assume.

(tests/unit/test_bench_direct_io.py: the option from each bench's command line to here.)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from spk_visor.install import blockdev
from tests.support import loopattach
from tests.support.abdisk import ab_disk, need_ab_disk
from tests.support.loopdisk import LoopDisk

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
    pytest.skip(f"this machine's temporary folder cannot back a DIO loop device: {exc}")


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "buffered"])
def test_an_ab_disk_in_each_mode_says_so_and_writes_past_the_page_cache_only_with_dio(
    tmp_path: Path, direct: bool
) -> None:
    need_ab_disk()
    with contextlib.ExitStack() as stack:
        try:
            d = stack.enter_context(ab_disk(tmp_path, slot_mib=8, esp_mib=1, direct_io=direct))
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


def test_a_deploy_target_disk_with_direct_io_says_so(tmp_path: Path) -> None:
    need_ab_disk()
    try:
        disk = LoopDisk(tmp_path, "64M", direct_io=True)
    except loopattach.DirectIoRefused as e:
        _refused_skips(e)
    try:
        assert loopattach.dio(disk.dev)
        assert _sysfs_dio(disk.dev) == "1"
    finally:
        disk.detach()
        disk.file.unlink()
    buffered = LoopDisk(tmp_path, "64M")
    try:
        assert not loopattach.dio(buffered.dev)
    finally:
        buffered.detach()
        buffered.file.unlink()
