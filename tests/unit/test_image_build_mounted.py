"""tests/support/image_build.mounted(): the image is unmounted and its mountpoint removed
even when something still holds a file open under it (a busy unmount); a real ext4
image, loop-mounted as root."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.support.image_build import mounted
from tests.support.prereq import need_command, need_root


def make_image(tmp_path: Path) -> Path:
    need_root()
    need_command("mkfs.ext4", "e2fsprogs")
    need_command("losetup", "mount")
    image = tmp_path / "small.ext4"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(_tree(tmp_path)), str(image)], check=True, timeout=60
    )
    return image


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("hello\n")
    return tree


def mounts() -> str:
    return Path("/proc/self/mounts").read_text()


def loops_of(image: Path) -> str:
    return subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def test_a_busy_mount_is_still_unmounted_and_its_mountpoint_removed(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    fd = -1
    try:
        with mounted(image) as mnt:
            assert (mnt / "hello").read_text() == "hello\n"
            # An open file keeps the mount busy: a plain umount fails with EBUSY.
            fd = os.open(mnt / "hello", os.O_RDONLY)
        assert not mnt.exists()
        assert f" {mnt} " not in mounts()
    finally:
        if fd >= 0:
            os.close(fd)
    # Once the last file closes, the lazily detached filesystem and its loop device go.
    deadline = time.monotonic() + 10
    while loops_of(image) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert loops_of(image) == ""


def test_an_idle_mount_is_unmounted_and_its_mountpoint_removed(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    with mounted(image) as mnt:
        assert f" {mnt} " in mounts()
    assert not mnt.exists()
    assert f" {mnt} " not in mounts()
