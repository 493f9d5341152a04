"""The manifest entry of a raw image shipped as a zstd blob, for image-writer tests."""

from __future__ import annotations

import hashlib

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
