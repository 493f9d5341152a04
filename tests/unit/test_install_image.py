"""The image writer's read-back and flush discipline, on a plain file (O_DIRECT where the
filesystem allows it). The OTA and deploy tests cover what it writes; this one what it
proves on the way."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import zstandard

from spk_visor.install import blockdev
from spk_visor.install import image as image_writer
from tests.support.zstd_image import evict, stage_file, zstd_image

MIB = 1 << 20


def test_every_window_is_read_back_and_only_flushed_bytes_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_writer, "CHUNK", MIB)
    monkeypatch.setattr(image_writer, "SYNC_BYTES", 2 * MIB)
    raw = hashlib.shake_256(b"image").digest(3 * MIB) + bytes(4 * MIB + 100)
    blob = zstandard.ZstdCompressor().compress(raw)
    (tmp_path / "blob").write_bytes(blob)
    image = zstd_image(raw, blob)
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(len(raw) + MIB))
    body = len(raw) - image_writer.HEAD - 100  # 100: the unaligned tail, kept for the end
    windows = body // MIB

    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    writer: image_writer.ImageWriter | None = None
    real_sync, real_read = os.fdatasync, blockdev.pread_into

    def fdatasync(fd: int) -> None:
        checked = writer.written if writer is not None else 0
        real_sync(fd)
        with lock:
            events.append(("flushed", checked))

    def pread_into(fd: int, view: memoryview, offset: int) -> int:
        with lock:
            events.append(("read", offset))
        return real_read(fd, view, offset)

    def on_durable(n: int) -> None:
        with lock:
            events.append(("durable", n))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(blockdev, "pread_into", pread_into)
    fd, direct = blockdev.open_for_writing(str(slot))
    try:
        writer = image_writer.ImageWriter(fd, direct, image, len(blob), on_durable=on_durable)
        with (tmp_path / "blob").open("rb", buffering=0) as f, image_writer.FileSource(f) as src:
            writer.stream(src)
        writer.write_ends()
        writer.check_ends()
    finally:
        os.close(fd)
    assert slot.read_bytes()[: len(raw)] == raw

    # Every body window was read back from the device, then the head and the tail.
    reads = [at for kind, at in events if kind == "read"]
    want = [image_writer.HEAD + i * MIB for i in range(windows)]
    assert sorted(reads[:windows]) == want
    assert sorted(reads[windows:]) == [0, len(raw) - 100]
    # Durable means flushed: each report follows a flush that began with at least that
    # many bytes checked, and the last one covers the whole body.
    flushed = 0
    durable = [n for kind, n in events if kind == "durable"]
    for kind, n in events:
        if kind == "flushed":
            flushed = max(flushed, n)
        elif kind == "durable":
            assert n <= flushed
    assert durable and durable[-1] == body and durable == sorted(durable)
    flushes = sum(1 for kind, _n in events if kind == "flushed")
    if direct:
        # O_DIRECT reads are the device's answer: no flush per window, one per SYNC_BYTES.
        assert flushes <= windows // 2 + 1
    else:
        # Through the page cache each window must be flushed and dropped to be re-read.
        assert flushes >= windows


def test_a_regular_file_gets_its_zeros_written_without_zeroout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BLKZEROOUT is for block devices: a file standing in for a slot is written whole."""
    monkeypatch.setattr(blockdev, "zeroout", lambda *a: pytest.fail("zeroout on a file"))
    raw = hashlib.shake_256(b"file").digest(2 * MIB) + bytes(4 * MIB)
    blob = zstandard_blob(raw)
    (tmp_path / "blob").write_bytes(blob)
    image = zstd_image(raw, blob)
    slot = tmp_path / "slot"
    slot.write_bytes(b"\xff" * len(raw))
    writer = stage_file(str(slot), image, tmp_path / "blob")
    assert slot.read_bytes() == raw
    assert writer.zeroed_bytes == 0
    assert writer.written_bytes == len(raw) - image_writer.HEAD


def test_a_blob_that_fails_to_read_fails_the_stream(tmp_path: Path) -> None:
    """An I/O error on the stored blob reaches the caller (after the pieces read before
    it were decoded); nothing hangs and the slot's head stays unwritten."""
    raw = hashlib.shake_256(b"image").digest(2 * MIB) + bytes(2 * MIB)
    blob = zstandard.ZstdCompressor().compress(raw)
    image = zstd_image(raw, blob)
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(len(raw)))

    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.left = len(blob) // 2

        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            if self.left <= 0:
                raise OSError(errno.EIO, "the store's disk failed")
            n = min(len(buf), self.left, 4096)
            start = len(blob) // 2 - self.left
            buf[:n] = blob[start : start + n]
            self.left -= n
            return n

    fd, direct = blockdev.open_for_writing(str(slot))
    try:
        writer = image_writer.ImageWriter(fd, direct, image, len(blob))
        with image_writer.FileSource(Failing()) as src, pytest.raises(OSError) as e:
            writer.stream(src)
    finally:
        os.close(fd)
    assert e.value.errno == errno.EIO
    assert slot.read_bytes()[: image_writer.HEAD] == bytes(image_writer.HEAD)


def _stream_blob(tmp_path: Path, raw: bytes, blob: bytes, f: io.RawIOBase) -> bool:
    """Stream `blob` (read through `f`) onto a fresh slot file; whether it was read with
    O_DIRECT. Raises what the writer raises."""
    image = zstd_image(raw, blob)
    slot = tmp_path / "slot"
    slot.write_bytes(bytes(len(raw)))
    fd, direct = blockdev.open_for_writing(str(slot))
    try:
        writer = image_writer.ImageWriter(fd, direct, image, len(blob))
        with image_writer.FileSource(f) as src:
            writer.stream(src)
            used_direct = src.direct
        writer.write_ends()
        writer.check_ends()
    finally:
        os.close(fd)
    assert slot.read_bytes() == raw
    return used_direct


def zstandard_blob(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(raw)


def _direct_allowed(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def test_a_stored_blob_is_read_with_o_direct_and_still_checked(tmp_path: Path) -> None:
    """A blob not in the page cache bypasses it where its filesystem allows it; its
    sha256 and size are still checked on the bytes the decoder used, even when its length
    is no multiple of the block size."""
    raw = hashlib.shake_256(b"direct").digest(5 * MIB + 12345) + bytes(3 * MIB)
    blob = zstandard_blob(raw)
    assert len(blob) % blockdev.ALIGN
    path = tmp_path / "blob"
    path.write_bytes(blob)
    if not _direct_allowed(path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    evict(path)
    with path.open("rb", buffering=0) as f:
        assert _stream_blob(tmp_path, raw, blob, f) is True

    # One byte changed past the first piece: the blob's signed hash refuses it.
    bad = bytearray(blob)
    bad[len(bad) - 10] ^= 1
    path.write_bytes(bytes(bad))
    evict(path)
    with path.open("rb", buffering=0) as f, pytest.raises(image_writer.ImageError) as e:
        _stream_blob(tmp_path, raw, blob, f)
    assert e.value.reason in ("blob_hash", "bad_image")


def test_a_direct_read_refused_after_open_falls_back_to_the_page_cache(tmp_path: Path) -> None:
    """A filesystem that accepts O_DIRECT on the file but refuses the read (EINVAL): the
    blob is read through the page cache instead, from the same position."""
    raw = hashlib.shake_256(b"fallback").digest(3 * MIB) + bytes(2 * MIB)
    blob = zstandard_blob(raw)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    if not _direct_allowed(path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")

    class Refusing(io.FileIO):
        refused = 0

        def readinto(self, buf: Any) -> int:
            if fcntl.fcntl(self.fileno(), fcntl.F_GETFL) & os.O_DIRECT:
                Refusing.refused += 1
                raise OSError(errno.EINVAL, "Invalid argument")
            return super().readinto(buf)

    evict(path)
    with Refusing(path, "rb") as f:
        assert _stream_blob(tmp_path, raw, blob, f) is False
    assert Refusing.refused == 1


def test_leaving_the_source_early_while_a_read_is_slow_does_not_hang() -> None:
    """The decoder stops (a read-back mismatch, a zstd error) while the reader thread is
    inside a slow read: leaving the source must stop both threads. The hasher waited for
    a piece the reader, seeing the stop, never queued, and the join hung forever (with
    the OTA lock held)."""
    inside_read = threading.Event()
    release_read = threading.Event()

    class Slow(io.RawIOBase):
        def __init__(self) -> None:
            self.reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            self.reads += 1
            if self.reads > 1:  # the second read: the disk is slow
                inside_read.set()
                release_read.wait(timeout=30)
            buf[:4096] = bytes(4096)
            return 4096

    src = image_writer.FileSource(Slow())
    src.read(4096)  # the decoder took a piece...
    assert inside_read.wait(timeout=10)
    # ...and stops while the reader is still inside its read; the read ends a little
    # after the source is left.
    threading.Timer(0.3, release_read.set).start()
    done = threading.Event()

    def leave() -> None:
        src.__exit__(None, None, None)
        done.set()

    threading.Thread(target=leave, daemon=True).start()
    assert done.wait(timeout=20), "leaving the source hung with a read in flight"


@pytest.mark.parametrize("given", ["right", "none", "wrong_hash", "wrong_size"])
def test_a_pipe_that_does_not_hash_is_checked_against_the_pair_its_end_carries(
    tmp_path: Path, given: str
) -> None:
    """Deploy's pipe does not hash (its store copy does): the writer checks the blob
    against the (size, sha256) the pipe's close carries, and a feed that ends without
    one is refused like a mismatch, never taken as matching."""
    raw = hashlib.shake_256(b"pair").digest(2 * MIB) + bytes(MIB + 7)
    blob = zstandard.ZstdCompressor().compress(raw)
    image = zstd_image(raw, blob)
    right = (len(blob), hashlib.sha256(blob).hexdigest())
    pair = {
        "right": right,
        "none": None,
        "wrong_hash": (len(blob), hashlib.sha256(b"other").hexdigest()),
        "wrong_size": (len(blob) + 1, right[1]),
    }[given]
    slot = tmp_path / "slot"
    slot.write_bytes(b"")
    pipe = image_writer.RecordPipe(4, hashed=False)
    fd, direct = blockdev.open_for_writing(str(slot))
    writer = image_writer.ImageWriter(fd, direct, image, len(blob))
    errors: list[BaseException] = []

    def decode() -> None:
        try:
            writer.stream(pipe)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=decode)
    t.start()
    try:
        for at in range(0, len(blob), 64 << 10):
            pipe.put(blob[at : at + (64 << 10)])
        assert pipe.digest is None and pipe.count == 0  # nothing hashed on put
        pipe.close(blob=pair)
        t.join(60)
    finally:
        os.close(fd)
    if given == "right":
        assert errors == []
        return
    assert len(errors) == 1 and isinstance(errors[0], image_writer.ImageError)
    assert errors[0].reason == "blob_hash", errors[0]
