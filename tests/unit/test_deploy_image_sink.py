"""The image sink's store copy runs on its own thread, writing the channel's receive
buffers themselves: it must still keep exactly the blob's bytes (written before the
channel reuses a buffer), and a failed copy must fail the image and leave no blob."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard

from spk_visor.deploy import channel, install
from spk_visor.install import blockdev
from spk_visor.ota.nodeconf import NodePaths
from spk_visor.ota.store import BlobStore
from spk_visor.trust.manifest import ImageComponent

RECORD = 64 << 10


class _Inst:
    def __init__(self, tmp_path: Path) -> None:
        self.slot = tmp_path / "slot"
        self.slot.write_bytes(b"")
        self.parts = {"root-a": str(self.slot)}
        self.durable_bytes = 0
        self.image_sha256: str | None = None
        self.store = BlobStore(NodePaths(tmp_path / "data"))

    def emit_progress(self) -> None:
        pass

    def store_partial(self, blob_id: str) -> int:
        return install.Installer.store_partial(self, blob_id)  # type: ignore[arg-type]


def _image() -> tuple[bytes, bytes, ImageComponent]:
    # Incompressible enough to take many records; an unaligned tail.
    raw = os.urandom(1 << 20) + bytes(2 << 20) + os.urandom((1 << 20) + 1234)
    blob = zstandard.ZstdCompressor(level=1).compress(raw)
    image = ImageComponent(
        "base", "1", "sha256:" + hashlib.sha256(blob).hexdigest(), "zstd", len(raw),
        hashlib.sha256(raw).hexdigest(),
    )  # fmt: skip
    return raw, blob, image


def _feed_like_the_channel(sink: Any, blob: bytes) -> None:
    """Each record lands in the next buffer of a ring of RECV_RING, as recv_view does:
    a buffer is overwritten RECV_RING records after it was handed on."""
    ring = [memoryview(bytearray(RECORD)) for _ in range(channel.RECV_RING)]
    for i, at in enumerate(range(0, len(blob), RECORD)):
        piece = blob[at : at + RECORD]
        buf = ring[i % len(ring)]
        buf[: len(piece)] = piece
        sink.write(buf[: len(piece)])


def _slow_copy(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
    """The store copy's writes lag far behind the session (or fail)."""
    real = blockdev.write_all

    def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        time.sleep(0.01)
        real(fd, data)

    monkeypatch.setattr(blockdev, "write_all", write_all)


def test_the_store_copy_keeps_the_blob_while_the_channel_reuses_its_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, blob, image = _image()
    _slow_copy(monkeypatch)
    inst = _Inst(tmp_path)
    sink = install._ImageSink(inst, image, len(blob))  # type: ignore[arg-type]
    try:
        _feed_like_the_channel(sink, blob)
        sink.finish()
    finally:
        sink.close()
    assert inst.image_sha256 == image.raw_sha256
    assert inst.slot.read_bytes()[: len(raw)] == raw
    assert inst.store.path(image.blob).read_bytes() == blob
    assert list(inst.store.partial_dir.iterdir()) == []
    figures = sink.figures()
    assert figures["store"]["busy_s"] > 0 and "feed_wait_s" in figures["decode"]


def test_a_failed_store_copy_fails_the_image_and_keeps_no_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _raw, blob, image = _image()
    _slow_copy(monkeypatch, fail=True)
    inst = _Inst(tmp_path)
    sink = install._ImageSink(inst, image, len(blob))  # type: ignore[arg-type]
    try:
        with pytest.raises(install.InstallError) as caught:
            _feed_like_the_channel(sink, blob)
            sink.finish()
    finally:
        sink.close()
    assert caught.value.reason == "io_error"
    assert "store copy" in caught.value.message and "No space left" in caught.value.message
    assert inst.image_sha256 is None  # nothing is marked bootable
    assert list(inst.store.partial_dir.iterdir()) == []
    assert list(inst.store.blobs_dir.iterdir()) == []


class _Sha256Spy:
    """hashlib.sha256 that notes which thread fed it how many bytes."""

    calls: list[tuple[str, int]]

    def __init__(self, real: Any, calls: list[tuple[str, int]]) -> None:
        self._h = real()
        self.calls = calls

    def update(self, data: Any) -> None:
        self.calls.append((threading.current_thread().name, memoryview(data).nbytes))
        self._h.update(data)

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())

    def digest(self) -> bytes:
        return bytes(self._h.digest())


def test_the_session_thread_does_not_hash_the_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session thread (here: the test's) only hands records on: the blob's sha256
    runs on the store copy's thread, over every byte, and is the hash the writer checks."""
    _raw, blob, image = _image()
    calls: list[tuple[str, int]] = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda: _Sha256Spy(real, calls))
    inst = _Inst(tmp_path)
    sink = install._ImageSink(inst, image, len(blob))  # type: ignore[arg-type]
    monkeypatch.setattr(hashlib, "sha256", real)
    try:
        _feed_like_the_channel(sink, blob)
        sink.finish()
    finally:
        sink.close()
    session = threading.current_thread().name
    assert [c for c in calls if c[0] == session] == []
    assert sum(n for name, n in calls if name == "image-store") == len(blob)
    assert inst.image_sha256 == image.raw_sha256
    assert inst.store.path(image.blob).read_bytes() == blob
    figures = sink.figures()
    assert figures["store"]["hash_s"] > 0 and figures["store"]["cpu_s"] > 0


class _Gate:
    """Holds the decoder before it reads record `k` (`hold`), or lets a test wait until
    the decoder has let go of record `k` (`passed`): records are RECORD bytes each and
    the decoder asks for one record per read."""

    def __init__(self, sink: Any, k: int, hold: bool) -> None:
        self.start, self.end = k * RECORD, (k + 1) * RECORD
        self.returned = 0
        self.open = threading.Event()
        if not hold:
            self.open.set()
        self.cond = threading.Condition()
        self.real = sink.pipe.read
        sink.pipe.read = self.read

    def read(self, n: int = -1) -> Any:
        if self.returned >= self.start:
            assert self.open.wait(30), "the test never let the decoder go on"
        data = self.real(n)
        with self.cond:
            self.returned += len(data)
            self.cond.notify_all()
        return data

    def passed(self) -> None:
        """Wait until the decoder asked for the record after `k` (so it let go of k)."""
        with self.cond:
            assert self.cond.wait_for(lambda: self.returned > self.end, 30)


def _unbootable_and_nothing_kept(inst: _Inst) -> None:
    assert inst.image_sha256 is None
    # The first MiB (every filesystem's superblock) is written only after both hashes.
    assert inst.slot.read_bytes()[: 1 << 20].strip(b"\0") == b""
    assert list(inst.store.partial_dir.iterdir()) == []
    assert list(inst.store.blobs_dir.iterdir()) == []


def test_a_record_that_changes_before_the_store_copy_has_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record's buffer that changes while the store copy still holds it (as a buffer
    reused too early would): the decoder saw the signed bytes, the store copy did not.
    The blob's hash is taken of what the store copy wrote, so the image is refused as a
    blob mismatch, the slot stays unbootable and no store copy is kept."""
    _raw, blob, image = _image()
    k = len(blob) // RECORD // 2
    inst = _Inst(tmp_path)
    sink = install._ImageSink(inst, image, len(blob))  # type: ignore[arg-type]
    gate = _Gate(sink, k, hold=False)
    real = blockdev.write_all
    seen = 0

    def write_all(fd: int, data: Any) -> None:
        nonlocal seen
        if seen == k:
            gate.passed()  # the decoder has decoded the intact record k
            data[0] ^= 0xFF
        seen += 1
        real(fd, data)

    monkeypatch.setattr(blockdev, "write_all", write_all)
    try:
        with pytest.raises(install.InstallError) as caught:
            _feed_like_the_channel(sink, blob)
            sink.finish()
    finally:
        sink.close()
    assert caught.value.reason == "blob_hash", caught.value
    assert "does not match its signed hash" in caught.value.message
    _unbootable_and_nothing_kept(inst)


def test_a_record_that_changes_after_the_store_copy_had_it_is_refused(
    tmp_path: Path,
) -> None:
    """The other order: the store copy wrote and hashed the signed record, then the
    buffer changed before the decoder read it. The blob's hash matches; the decoded
    image does not (refused on raw_sha256, or as undecodable), and nothing is kept."""
    _raw, blob, image = _image()
    k = len(blob) // RECORD // 2
    inst = _Inst(tmp_path)
    sink = install._ImageSink(inst, image, len(blob))  # type: ignore[arg-type]
    gate = _Gate(sink, k, hold=True)
    ring = [memoryview(bytearray(RECORD)) for _ in range(channel.RECV_RING)]
    try:
        with pytest.raises(install.InstallError) as caught:
            for i, at in enumerate(range(0, len(blob), RECORD)):
                piece = blob[at : at + RECORD]
                buf = ring[i % len(ring)]
                buf[: len(piece)] = piece
                sink.write(buf[: len(piece)])
                if i == k:
                    deadline = time.monotonic() + 30
                    while sink.copy.count < (k + 1) * RECORD:  # written and hashed
                        assert time.monotonic() < deadline, "the store copy never took k"
                        time.sleep(0.001)
                    buf[100] ^= 0xFF
                    gate.open.set()
            sink.finish()
    finally:
        gate.open.set()
        sink.close()
    assert caught.value.reason in ("image_hash", "bad_image"), caught.value
    _unbootable_and_nothing_kept(inst)


def test_a_store_copy_that_fails_on_its_last_record_fails_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store write error that comes after the session handed on the last record is
    reported by finish, as the store copy's io_error, before anything is made bootable."""
    _raw, blob, image = _image()
    last = (len(blob) - 1) // RECORD
    real = blockdev.write_all
    seen = 0

    def write_all(fd: int, data: Any) -> None:
        nonlocal seen
        seen += 1
        if seen > last:
            raise OSError(errno.EIO, "Input/output error")
        real(fd, data)

    monkeypatch.setattr(blockdev, "write_all", write_all)
    inst = _Inst(tmp_path)
    sink = install._ImageSink(inst, image, len(blob))  # type: ignore[arg-type]
    try:
        _feed_like_the_channel(sink, blob)
        with pytest.raises(install.InstallError) as caught:
            sink.finish()
    finally:
        sink.close()
    assert caught.value.reason == "io_error"
    assert "store copy" in caught.value.message and "Input/output" in caught.value.message
    _unbootable_and_nothing_kept(inst)
