"""Read a file named by the user no further than a size cap."""

from __future__ import annotations

from pathlib import Path


def read_at_most(path: Path, limit: int) -> bytes:
    """At most `limit + 1` bytes of `path`: more than `limit` means too large, found
    without reading it whole (a device such as /dev/zero or a pipe never ends, and a
    wrong multi-gigabyte file would be read into memory). OSError as path.read_bytes()."""
    with path.open("rb") as f:
        return f.read(limit + 1)
