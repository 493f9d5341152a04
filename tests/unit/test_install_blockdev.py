"""install.blockdev's flush helpers on plain files and directories (the deploy and OTA
integration tests use them on loop devices)."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from spk_visor.install import blockdev


def test_sync_flushes_the_filesystem_of_a_path_not_every_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory gets syncfs on its own filesystem (never a machine-wide sync), and a
    failing syncfs is an OSError, not a silent success."""
    seen: list[str] = []
    real = blockdev._syncfs

    def spy(fd: int) -> int:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return int(real(fd))

    monkeypatch.setattr(blockdev, "_syncfs", spy)
    monkeypatch.setattr(os, "sync", lambda: pytest.fail("a machine-wide sync"))
    (tmp_path / "data").write_bytes(b"x" * 4096)
    blockdev.sync(tmp_path)
    assert seen == [str(tmp_path)]

    def failing(fd: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(blockdev, "_syncfs", failing)
    with pytest.raises(OSError) as e:
        blockdev.sync(tmp_path)
    assert e.value.errno == errno.EIO


def test_sync_of_a_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        blockdev.sync(tmp_path / "absent")
