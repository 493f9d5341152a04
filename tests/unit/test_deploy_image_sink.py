"""The image sink's store copy runs on its own thread, writing the channel's receive
buffers themselves: it must still keep exactly the blob's bytes (written before the
channel reuses a buffer), and a failed copy must fail the image and leave no blob."""

from __future__ import annotations

import errno
import hashlib
import os
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
