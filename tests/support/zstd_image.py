"""Image-writer test helpers: the manifest entry of a raw image shipped as a zstd blob,
that blob streamed onto a device, and a blob file put out of the page cache."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from spk_visor.install import blockdev
from spk_visor.install import image as image_writer
from spk_visor.trust.manifest import ImageComponent


def zstd_image(raw: bytes, blob: bytes) -> ImageComponent:
    """The manifest entry of `raw`, shipped as the zstd `blob`."""
    return ImageComponent(
        name="base",
        version="1",
        blob="sha256:" + hashlib.sha256(blob).hexdigest(),
        encoding="zstd",
        raw_size=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
    )


def stage_file(
    device: str,
    image: ImageComponent,
    blob: Path,
    on_durable: Callable[[int], None] | None = None,
) -> image_writer.ImageWriter:
    """`blob` (a file) streamed by the image writer onto `device`, its ends written and
    checked: what OTA staging does, without the journal around it."""
    fd, direct = blockdev.open_for_writing(device)
    try:
        writer = image_writer.ImageWriter(
            fd, direct, image, blob.stat().st_size, on_durable=on_durable
        )
        with blob.open("rb", buffering=0) as f, image_writer.FileSource(f) as src:
            writer.stream(src)
        writer.write_ends()
        writer.check_ends()
    finally:
        os.close(fd)
    return writer


def evict(path: Path) -> None:
    """`path` out of the page cache (its dirty pages written first: DONTNEED skips them),
    so FileSource reads it from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
