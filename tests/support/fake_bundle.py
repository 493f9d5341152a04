"""The stand-in bundle that tests/support/bin/fake-ota-node understands: MAGIC (the real
bundle magic, which `ota push` checks before it contacts a node), the total
size as a big-endian u64, then random bytes. Like a real bundle, whose header declares
every blob's size, it lets the node tell a complete stream from one cut short, and refuse
the latter (what `ota push` relies on when it drops a bundle it sent ahead)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MAGIC = b"SPKOTA\x00\x01"  # fake-ota-node has its own copy: it runs without this package
HEADER = len(MAGIC) + 8


def write(path: Path, size: int) -> str:
    """Write a stand-in bundle of `size` bytes (at least HEADER); its sha256."""
    if size < HEADER:
        raise ValueError(f"a stand-in bundle has at least {HEADER} bytes")
    digest = hashlib.sha256()
    with path.open("wb") as f:
        head = MAGIC + size.to_bytes(8, "big")
        digest.update(head)
        f.write(head)
        left = size - len(head)
        while left:
            block = os.urandom(min(left, 1 << 22))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()
