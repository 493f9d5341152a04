"""How FileSource reads a stored blob: through the page cache where the blob is cached
(as it is right after `ota pull` downloaded it), from the disk without filling the page
cache where it is not. On a real ext4 on a loop device, so "from the disk" is a real read
(counted in /proc/self/io, of a fresh process that does only that read) and "cached" is the
kernel's own answer (mincore)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.install import blockdev
from spk_visor.install import image as image_writer
from tests.support.loopdisk import LoopDisk
from tests.support.mounts import unmount
from tests.support.prereq import need_command, need_root
from tests.support.zstd_image import evict

MIB = 1 << 20
# Three pieces and a bit: the runs cross piece boundaries, the tail is unaligned.
BLOB_SIZE = 2 * image_writer.READ_SIZE + 9 * MIB + 12345


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A directory on a fresh ext4 on a loop device (a real block device whatever the
    filesystem of tmp_path is), unmounted and detached afterwards."""
    need_root()
    need_command("mkfs.ext4", "e2fsprogs")
    need_command("losetup", "mount")
    disk = LoopDisk(tmp_path, "96M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", disk.dev], check=True, timeout=60)
        subprocess.run(["mount", disk.dev, str(mnt)], check=True, timeout=30)
        try:
            yield mnt
        finally:
            # Never leave a mount behind, even when the test failed with the blob open.
            unmount(mnt)
    finally:
        disk.detach()


def _blob(directory: Path) -> tuple[Path, bytes]:
    data = hashlib.shake_256(b"blob").digest(BLOB_SIZE)
    path = directory / "blob"
    path.write_bytes(data)
    return path, data


def _cache(path: Path, ranges: list[tuple[int, int]]) -> None:
    """Read exactly these (offset, length) ranges into the page cache (no read-ahead)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset, length in ranges:
            buf = bytearray(length)
            assert os.preadv(fd, [buf], offset) == length
    finally:
        os.close(fd)


def _resident(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return blockdev.cached_pages(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _not_cached_again(path: Path, at_open: bytes) -> None:
    """No page that was not cached at open is cached now. (The reverse is not asked:
    memory pressure may evict a cached page meanwhile.)"""
    now = _resident(path)
    assert not any(n and not o for o, n in zip(at_open, now, strict=True))


# Run in a fresh process: /proc/self/io counts every thread of the process, and a thread
# another test left behind would count its reads as ours.
_MEASURED_READ = """
import hashlib, json, sys
from spk_visor.install import image

def disk_reads():
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return None

before = disk_reads()
got = hashlib.sha256()
size = 0
with open(sys.argv[1], "rb", buffering=0) as f, image.FileSource(f) as src:
    while piece := src.read(image.READ_SIZE):
        got.update(piece)
        size += len(piece)
after = disk_reads()
print(json.dumps({
    "got": [size, got.hexdigest()],
    "blob": list(src.blob) if src.blob else None,
    "read_bytes": src.read_bytes,
    "disk": None if before is None else after - before,
}))
"""


def _measured_read(path: Path, data: bytes) -> tuple[int, dict[str, int]]:
    """Read `path` through FileSource in a fresh process; check it handed over `data`
    and hashed it; return the bytes read from the disk and FileSource's own counters."""
    res = subprocess.run(
        [sys.executable, "-c", _MEASURED_READ, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = json.loads(res.stdout)
    want = [len(data), hashlib.sha256(data).hexdigest()]
    assert out["got"] == want
    assert out["blob"] == want
    if out["disk"] is None:
        pytest.skip("no /proc/self/io (kernel without task I/O accounting)")
    return out["disk"], out["read_bytes"]


def _drain(f: io.RawIOBase) -> tuple[bytes, tuple[int, str] | None, image_writer.FileSource]:
    """All bytes a FileSource hands the decoder, and the (size, sha256) it hashed."""
    got = bytearray()
    with image_writer.FileSource(f) as src:
        while piece := src.read(image_writer.READ_SIZE):
            got += piece
    return bytes(got), src.blob, src


def _check_same(got: bytes, blob: tuple[int, str] | None, data: bytes) -> None:
    assert got == data
    assert blob == (len(data), hashlib.sha256(data).hexdigest())


def test_a_cached_blob_is_read_from_the_page_cache_not_the_disk(ext4: Path) -> None:
    """Right after `ota pull` the blob is cached: reading it again from the disk (what
    O_DIRECT did) competes with the slot's writes for nothing."""
    path, data = _blob(ext4)
    _cache(path, [(0, len(data))])
    assert 0 not in _resident(path)
    read, counted = _measured_read(path, data)
    assert sum(counted.values()) == len(data)
    # Pages evicted before the open (memory pressure) are read from the disk: 3/4, not all.
    assert counted["cached"] >= len(data) * 3 // 4, counted
    # Memory pressure may evict a page meanwhile: a bound, not zero.
    assert read < len(data) // 4, f"{read} bytes read from the disk for a blob in the page cache"


def test_a_cold_blob_is_read_from_the_disk_and_not_left_in_the_page_cache(ext4: Path) -> None:
    """A blob read once must not push other pages out of the cache for itself."""
    path, data = _blob(ext4)
    evict(path)
    assert 1 not in _resident(path)
    read, counted = _measured_read(path, data)
    assert read >= len(data) - MIB
    assert _resident(path).count(1) == 0
    assert counted["direct"] == len(data)


def _half_cached(ext4: Path) -> tuple[Path, bytes, bytes]:
    """A blob with some ranges cached (across a piece boundary, and inside a piece)."""
    path, data = _blob(ext4)
    evict(path)
    piece = image_writer.READ_SIZE
    _cache(path, [(0, 6 * MIB), (piece - 3 * MIB, 5 * MIB), (2 * piece + 4 * MIB, 2 * MIB)])
    at_open = _resident(path)
    assert 0 in at_open and 1 in at_open
    return path, data, at_open


def test_a_partly_cached_blob_reads_only_its_uncached_part_from_the_disk(ext4: Path) -> None:
    """What was cached is read from memory and stays cached; what was not is read from
    the disk and is not cached afterwards."""
    path, data, at_open = _half_cached(ext4)
    cold = at_open.count(0) * blockdev.PAGE
    read, counted = _measured_read(path, data)
    # A segment only partly cached is read from the disk whole: a little slack.
    assert counted["direct"] + counted["uncached"] <= cold + 2 * MIB, counted
    assert counted["cached"] > 0, counted
    # Pages evicted meanwhile are read from the disk again: a generous bound.
    assert read <= cold + 8 * MIB, f"{read} bytes read from the disk, {cold} were not cached"
    _not_cached_again(path, at_open)


class _RefusingDirect(io.FileIO):
    """A filesystem that takes O_DIRECT on open but refuses the read (EINVAL)."""

    refused = 0

    def readinto(self, buf: Any) -> int:
        if fcntl.fcntl(self.fileno(), fcntl.F_GETFL) & os.O_DIRECT:
            self.refused += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return super().readinto(buf)


def test_without_o_direct_the_uncached_pages_read_are_dropped_again(ext4: Path) -> None:
    """Where O_DIRECT is refused, the blob is read through the page cache; the pages that
    were not cached before are dropped once read, those that were stay."""
    path, data, at_open = _half_cached(ext4)
    with _RefusingDirect(path, "rb") as f:
        got, blob, src = _drain(f)
    _check_same(got, blob, data)
    assert f.refused == 1
    assert src.direct is False
    _not_cached_again(path, at_open)
    assert src.read_bytes["uncached"] > 0


@pytest.mark.parametrize("cached", [True, False])
def test_a_read_error_on_a_real_blob_fails_the_stream(ext4: Path, cached: bool) -> None:
    """An I/O error in the middle of the blob, cached or not, reaches the decoder after
    the bytes before it, and the source leaves no thread behind."""
    path, data = _blob(ext4)
    if cached:
        _cache(path, [(0, len(data))])
    else:
        evict(path)

    class Failing(io.FileIO):
        reads = 0

        def readinto(self, buf: Any) -> int:
            self.reads += 1
            if self.reads > 2 and self.tell() >= image_writer.READ_SIZE:
                raise OSError(errno.EIO, "the store's disk failed")
            return super().readinto(buf)

    got = bytearray()
    with (
        Failing(path, "rb") as f,
        image_writer.FileSource(f) as src,
        pytest.raises(OSError) as e,
    ):
        while piece := src.read(image_writer.READ_SIZE):
            got += piece
    assert e.value.errno == errno.EIO
    assert len(got) >= image_writer.READ_SIZE
    assert bytes(got) == data[: len(got)]
    assert src.blob is None
