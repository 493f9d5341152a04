"""The image writer's zero runs on a real loop-device partition: zeroed with BLKZEROOUT
instead of written, and still read back and compared like every other byte.

The slot is filled with garbage first, so a zero run that never reached the device shows
as garbage, and the device is read afterwards through the loop device's backing file
(not through the writer, not through the partition it wrote)."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from spk_visor.install import blockdev
from spk_visor.install import image as image_writer
from spk_visor.ota import slots
from spk_visor.ota.context import OtaContext
from tests.support import ota_slots_worker as node
from tests.support.abdisk import AbDisk, ab_disk, fill, need_ab_disk
from tests.support.prereq import need_command
from tests.support.zstd_image import stage_file, zstd_image

MIB = 1 << 20
KIB = 1 << 10
SLOT_MIB = 48


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[AbDisk]:
    need_ab_disk()
    with ab_disk(tmp_path, slot_mib=SLOT_MIB, esp_mib=1) as d:
        # Garbage everywhere: random in slot b (the target), 0xff in slot a (its neighbour).
        fill(d.root_b, os.urandom)
        fill(d.root_a, lambda n: b"\xff" * n)
        yield d


def on_disk(disk: AbDisk, device: str, offset: int, length: int) -> bytes:
    """Bytes of a partition, read from the loop device's backing file."""
    return disk.backing(device, offset, length)


def image_with_zero_runs() -> bytes:
    """Random data with zero runs at a window's start, middle (unaligned to the scan
    block), end, across a window boundary, a hole smaller than a scan block, and a zero
    run at the end of the last (short) window; the unaligned tail is data."""
    head, w = image_writer.HEAD, image_writer.CHUNK
    body_end = head + 2 * w + 5 * MIB
    raw = bytearray(hashlib.shake_256(b"zero runs").digest(body_end + 1000))
    for start, end in (
        (head, head + 2 * MIB),  # window 0 starts with zeros
        (head + 6 * MIB + 100 * KIB, head + 8 * MIB + 3 * KIB),  # middle, unaligned
        (head + 10 * MIB, head + 10 * MIB + 64 * KIB),  # smaller than a scan block
        (head + w - 3 * MIB, head + w + 2 * MIB),  # across windows 0 and 1
        (head + 2 * w - MIB, head + 2 * w),  # window 1 ends with zeros
        (head + 2 * w + 4 * MIB, body_end),  # the last window ends with zeros
    ):
        raw[start:end] = bytes(end - start)
    return bytes(raw)


def expected_zero_runs(raw: bytes) -> list[tuple[int, int]]:
    """The (offset, length) a writer should zero: whole scan blocks of zeros, counted from
    each window's start, adjacent ones joined within a window (independent of the writer)."""
    head, w, g = image_writer.HEAD, image_writer.CHUNK, image_writer.ZERO_BLOCK
    body_end = head + (len(raw) - head) // blockdev.ALIGN * blockdev.ALIGN
    runs: list[tuple[int, int]] = []
    for window in range(head, body_end, w):
        end = min(window + w, body_end)
        prev_end = -1
        for at in range(window, end, g):
            n = min(g, end - at)
            if raw[at : at + n] == bytes(n):
                if at == prev_end:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n)
                else:
                    runs.append((at, n))
                prev_end = at + n
    return runs


def stage(
    tmp_path: Path, device: str, raw: bytes, events: list[tuple[str, int]] | None = None
) -> image_writer.ImageWriter:
    """The writer's whole job on `device`: stream, ends, ends checked. `events` gets
    ("durable", n) for each durable report."""
    blob = zstandard.ZstdCompressor(level=1).compress(raw)
    (tmp_path / "blob").write_bytes(blob)
    durable: list[int] = []

    def on_durable(n: int) -> None:
        durable.append(n)
        if events is not None:
            events.append(("durable", n))

    writer = stage_file(device, zstd_image(raw, blob), tmp_path / "blob", on_durable)
    body = len(raw) - image_writer.HEAD - len(writer.tail)
    assert durable and durable[-1] == body, "the last flush covers the whole body"
    return writer


def spy_zeroout(
    monkeypatch: pytest.MonkeyPatch, real: bool = True, events: list[tuple[str, int]] | None = None
) -> list[tuple[int, int]]:
    """The writer's zeroout calls; `events` gets ("zeroed", end) when one returned."""
    calls: list[tuple[int, int]] = []
    original = blockdev.zeroout

    def spy(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        if real:
            original(fd, offset, length)
        if events is not None:
            events.append(("zeroed", offset + length))

    monkeypatch.setattr(blockdev, "zeroout", spy)
    return calls


def test_zero_runs_are_zeroed_on_the_device_and_the_slot_equals_the_image(
    tmp_path: Path, disk: AbDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = image_with_zero_runs()
    want = expected_zero_runs(raw)
    events: list[tuple[str, int]] = []
    real_sync = os.fdatasync

    def fdatasync(fd: int) -> None:
        events.append(("flush", 0))
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(image_writer, "SYNC_BYTES", 8 * MIB)  # several flushes
    calls = spy_zeroout(monkeypatch, events=events)
    writer = stage(tmp_path, disk.root_b, raw, events)

    # Byte for byte, read around the writer; past the image the garbage is untouched, and
    # the neighbouring slot too (the ranges are relative to the partition).
    assert on_disk(disk, disk.root_b, 0, len(raw)) == raw
    after = on_disk(disk, disk.root_b, len(raw), SLOT_MIB * MIB - len(raw))
    assert after != bytes(len(after)) and after.count(0) < len(after) // 64
    assert on_disk(disk, disk.root_a, 0, SLOT_MIB * MIB) == b"\xff" * (SLOT_MIB * MIB)

    # Every whole zero block went through BLKZEROOUT, runs joined within a window.
    assert calls == want
    assert all(at % 512 == 0 and n % 512 == 0 for at, n in calls)
    zeroed = sum(n for _at, n in want)
    body = len(raw) - image_writer.HEAD - len(writer.tail)
    assert writer.zeroed_bytes == zeroed > 10 * MIB
    assert writer.written_bytes == body - zeroed
    assert writer.figures()["bytes"] == {"written_bytes": body - zeroed, "zeroed_bytes": zeroed}

    # Durable means flushed for zeroed ranges too: when the first n body bytes are
    # reported durable, every zeroout inside them had returned before a flush began.
    zeroed_before_flush: set[int] = set()
    done: set[int] = set()
    reports = 0
    for kind, n in events:
        if kind == "zeroed":
            done.add(n)
        elif kind == "flush":
            zeroed_before_flush = set(done)
        else:
            reports += 1
            inside = {end for end in done if end <= image_writer.HEAD + n}
            assert inside <= zeroed_before_flush
            assert len(inside) == sum(1 for at, ln in want if at + ln <= image_writer.HEAD + n)
    assert reports >= 3


def test_a_zeroout_that_does_nothing_is_caught_by_the_read_back(
    tmp_path: Path, disk: AbDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that acknowledges BLKZEROOUT and keeps its old bytes: the read-back of
    the window refuses the stream, and OTA leaves the slot unbootable."""
    calls = spy_zeroout(monkeypatch, real=False)
    with pytest.raises(image_writer.ImageError) as e:
        stage(tmp_path, disk.root_b, image_with_zero_runs())
    assert e.value.reason == "read_back"
    assert calls

    # The same through OTA staging of a real ext4 image (mostly free space).
    need_command("grub-editenv", "grub-common")
    need_command("mkfs.ext4", "e2fsprogs")
    ctx: OtaContext = node.node(tmp_path / "root", disk.root_a, disk.root_b)
    pub = node.publish(ctx, node.ext4_image(tmp_path / "v1.img", "release v1"))
    with pytest.raises(image_writer.ImageError) as e:
        slots.stage(ctx, pub.manifest, pub.manifest_hex)
    assert e.value.reason == "read_back"
    env = node.grub_vars(ctx.paths.sysroot)
    assert "next_entry" not in env and env["saved_entry"] == node.ENTRY_A
    assert ctx.journal.get("base")["phase"] == "failed"
    # No filesystem in the slot: its head holds no image bytes.
    assert on_disk(disk, disk.root_b, 0, image_writer.HEAD) == bytes(image_writer.HEAD)


def test_a_device_without_zeroout_gets_the_zeros_written(
    tmp_path: Path, disk: AbDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EOPNOTSUPP: that run and every later one is written as data; the ioctl is not
    tried again, the stream succeeds."""
    calls: list[tuple[int, int]] = []

    def unsupported(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(blockdev, "zeroout", unsupported)
    raw = image_with_zero_runs()
    writer = stage(tmp_path, disk.root_b, raw)
    assert on_disk(disk, disk.root_b, 0, len(raw)) == raw
    assert len(calls) == 1
    assert writer.zeroed_bytes == 0
    assert writer.written_bytes == len(raw) - image_writer.HEAD - len(writer.tail)


def test_an_unexpected_zeroout_error_fails_the_stream(
    tmp_path: Path, disk: AbDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO is the device failing, not a missing feature: no fallback, the stream fails."""

    def failing(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(blockdev, "zeroout", failing)
    with pytest.raises(OSError) as e:
        stage(tmp_path, disk.root_b, image_with_zero_runs())
    assert e.value.errno == errno.EIO
