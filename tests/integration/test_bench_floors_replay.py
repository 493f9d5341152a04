"""bench/floors.py's I/O floor on a real loop-device partition: the replay leaves the
device holding exactly the raw image (zero runs zeroed, data written, head and tail
last), and it zeroes and writes the same bytes the image writer does for that image.

The slots are filled with garbage first, so a run the replay skipped shows as garbage;
the device is read through the loop device's backing file afterwards."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from bench import floors
from spk_visor.install import blockdev
from spk_visor.install import image as image_writer
from tests.support.abdisk import AbDisk, ab_disk, fill, need_ab_disk
from tests.support.zstd_image import stage_file, zstd_image

MIB = 1 << 20
KIB = 1 << 10
SLOT_MIB = 48


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[AbDisk]:
    need_ab_disk()
    with ab_disk(tmp_path, slot_mib=SLOT_MIB, esp_mib=1) as d:
        for device in (d.root_a, d.root_b):
            fill(device, os.urandom)
        yield d


def raw_image() -> bytes:
    """Data with zero runs (a window's start, one not aligned to the writer's scan block,
    across two windows, the body's end), three windows and an unaligned tail of data."""
    head, w = image_writer.HEAD, image_writer.CHUNK
    size = head + 2 * w + 7 * MIB + 1234
    raw = bytearray(hashlib.shake_256(b"replay").digest(size))
    body_end = head + (size - head) // blockdev.ALIGN * blockdev.ALIGN
    for start, end in (
        (head, head + 3 * MIB),
        (head + 5 * MIB + 100 * KIB, head + 6 * MIB + 3 * KIB),
        (head + w - 2 * MIB, head + w + MIB),
        (body_end - 3 * MIB, body_end),
    ):
        raw[start:end] = bytes(end - start)
    return bytes(raw)


def load(tmp_path: Path, raw: bytes) -> blockdev.Buffer:
    path = tmp_path / "raw.img"
    path.write_bytes(raw)
    return floors.load(path)


def test_replay_leaves_the_raw_image_on_the_device(tmp_path: Path, disk: AbDisk) -> None:
    raw = raw_image()
    buf = load(tmp_path, raw)
    plan = floors.plan(buf, len(raw))
    assert plan.zeroed_bytes >= 9 * MIB  # the zero runs are really zeroed, not written
    seconds = floors.replay(disk.root_b, buf, plan, sync_bytes=2 * MIB)
    assert seconds > 0
    got = disk.backing(disk.root_b, 0, len(raw))
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(raw).hexdigest()
    # Past the image, the slot still holds its garbage: the replay wrote nothing more.
    after = disk.backing(disk.root_b, len(raw), 4096)
    assert after != bytes(4096)


def test_replay_writes_and_zeroes_what_the_image_writer_does(tmp_path: Path, disk: AbDisk) -> None:
    raw = raw_image()
    blob = zstandard.ZstdCompressor(level=1).compress(raw)
    (tmp_path / "blob").write_bytes(blob)
    writer = stage_file(disk.root_a, zstd_image(raw, blob), tmp_path / "blob")
    buf = load(tmp_path, raw)
    plan = floors.plan(buf, len(raw))
    floors.replay(disk.root_b, buf, plan)
    body = plan.body_end - plan.head_len
    assert plan.zeroed_bytes == writer.zeroed_bytes
    assert body - plan.zeroed_bytes == writer.written_bytes
    assert disk.backing(disk.root_b, 0, len(raw)) == disk.backing(disk.root_a, 0, len(raw))


def test_machine_replay_counts_the_machines_cpu(tmp_path: Path, disk: AbDisk) -> None:
    raw = raw_image()
    buf = load(tmp_path, raw)
    wall, cpu = floors.machine_replay(disk.root_b, buf, floors.plan(buf, len(raw)))
    assert wall > 0
    # The replay's writes, read-backs and flushes cost the machine some CPU (the loop
    # device's worker included); none counted means the counter does not work.
    assert 0 < cpu <= wall * (os.cpu_count() or 1) + 0.1
