"""Deploy's store copy reaches its disk while the blob streams, not in one fsync at the end.

The copy is a file on a real ext4 on a loop device. The loop device's own write counter
(/sys/block/loopN/stat) says what the filesystem has sent it: with the page cache left
alone, dirty pages wait up to 30 s (vm.dirty_expire_centisecs) and the whole blob went to
the disk in the caller's fsync after the last record.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spk_visor.install import blockdev, store_copy
from spk_visor.install.store_copy import StoreCopy
from tests.support.loopdisk import LoopDisk
from tests.support.prereq import DISK_TOOLS, need_commands, need_root

MIB = 1 << 20
RECORD = MIB


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[tuple[LoopDisk, Path]]:
    need_root()
    need_commands(DISK_TOOLS)
    disk = LoopDisk(tmp_path, "256M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", disk.dev],
            check=True,
            timeout=60,
        )
        subprocess.run(["mount", "-t", "ext4", disk.dev, str(mnt)], check=True, timeout=30)
        try:
            yield disk, mnt
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60, check=False)
    finally:
        disk.detach()


def _sectors_written(dev: str) -> int:
    # Field 7 of the block layer's stat file: sectors written (512 bytes each).
    return int(Path(f"/sys/block/{Path(dev).name}/stat").read_text().split()[6])


def test_the_copy_is_written_out_to_its_disk_as_it_streams(
    ext4: tuple[LoopDisk, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk, mnt = ext4
    monkeypatch.setattr(store_copy, "WRITE_OUT_BYTES", 8 * MIB, raising=False)
    records = [os.urandom(RECORD) for _ in range(48)]
    fd = os.open(mnt / "blob.partial", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # mkfs's and the mount's own writes are not the copy's (and the inode tables were
        # initialised by mkfs, not by ext4lazyinit writing to the disk during the test).
        os.sync()
        before = _sectors_written(disk.dev)
        copy = StoreCopy(fd, 4, lambda e: RuntimeError(str(e)))
        for r in records:
            copy.put(memoryview(r))
        # Wait (bounded) for the copy to have taken every record, without finishing it;
        # well under the 30 s after which the kernel writes dirty pages out by itself.
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            if copy.count == len(records) * RECORD and getattr(copy, "written_out", 0) >= 32 * MIB:
                break
            time.sleep(0.01)
        on_disk = (_sectors_written(disk.dev) - before) * 512
        size, digest = copy.finish()
    finally:
        os.close(fd)
    data = b"".join(records)
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert (mnt / "blob.partial").read_bytes() == data
    # Before any fsync, most of the 48 MiB were on the disk already (all but the last
    # WRITE_OUT_BYTES or so); the old copy had sent nothing.
    assert getattr(copy, "written_out", 0) >= 32 * MIB
    assert on_disk >= 32 * MIB, f"only {on_disk} bytes reached the disk before the fsync"


def test_a_failed_write_out_fails_the_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_copy, "WRITE_OUT_BYTES", MIB, raising=False)

    def broken(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, "the disk failed the write-out")

    monkeypatch.setattr(blockdev, "write_out", broken, raising=False)
    fd = os.open(tmp_path / "blob.partial", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copy = StoreCopy(fd, 2, lambda e: RuntimeError(f"store: {e}"))
        with pytest.raises(RuntimeError, match="the disk failed the write-out"):
            for _ in range(8):
                copy.put(memoryview(bytes(RECORD)))
            # The write-out runs on its own thread: wait (bounded) for it to have failed
            # before finishing, which would otherwise leave the rest to the fsync.
            deadline = time.monotonic() + 30
            while getattr(copy, "error", None) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            copy.finish()
        copy.stop()
    finally:
        os.close(fd)


def test_the_write_out_goes_a_slice_at_a_time_so_a_stop_waits_for_one_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk slower than the stream lets the copy run far ahead; an aborted deploy
    (stop) must not then wait for all of that to be written, only thrown away."""
    monkeypatch.setattr(store_copy, "WRITE_OUT_BYTES", MIB, raising=False)
    calls: list[int] = []

    def slow(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        time.sleep(0.2)  # a slow disk: the copy gets many slices ahead meanwhile

    monkeypatch.setattr(blockdev, "write_out", slow, raising=False)
    fd = os.open(tmp_path / "blob.partial", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copy = StoreCopy(fd, 4, lambda e: RuntimeError(str(e)))
        for _ in range(32):
            copy.put(memoryview(bytes(RECORD)))
        deadline = time.monotonic() + 30
        while getattr(copy, "count", 0) < 32 * RECORD and time.monotonic() < deadline:
            time.sleep(0.01)
        before_stop = len(calls)
        copy.stop()
        during_stop = len(calls) - before_stop
    finally:
        os.close(fd)
    assert calls, "nothing was written out"
    assert all(n <= MIB for n in calls), f"write-out calls of {calls} bytes"
    # The copy was up to 32 slices ahead; the stop waited for the slice in hand at most.
    assert during_stop <= 1, f"{during_stop} write-outs began while the stop waited"
