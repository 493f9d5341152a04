"""install.blockdev's flush helpers on plain files and directories (the deploy and OTA
integration tests use them on loop devices)."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
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


def test_zero_runs_finds_whole_zero_blocks_and_joins_neighbours() -> None:
    block = 64 << 10
    buf = blockdev.Buffer(10 * block)
    view = buf.view
    view[:] = b"\x01" * len(view)
    view[block : 3 * block] = bytes(2 * block)  # two zero blocks: one run
    view[4 * block + 1 : 5 * block] = bytes(block - 1)  # one data byte left: data
    view[9 * block : 10 * block - 4096] = bytes(block - 4096)  # the short last block
    n = 10 * block - 4096
    assert list(blockdev.zero_runs(buf, n, block)) == [
        (0, block, False),
        (block, 2 * block, True),
        (3 * block, 6 * block, False),
        (9 * block, block - 4096, True),
    ]
    assert list(blockdev.zero_runs(buf, 0, block)) == []
    with pytest.raises(ValueError):
        list(blockdev.zero_runs(buf, n, blockdev.ZERO_SCAN_MAX + 1))


def test_zeroout_refuses_unaligned_ranges_and_regular_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        blockdev.zeroout(0, 100, 512)
    path = tmp_path / "file"
    path.write_bytes(b"\x01" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            blockdev.zeroout(fd, 0, 4096)
    finally:
        os.close(fd)
    assert e.value.errno in blockdev.ZEROOUT_UNSUPPORTED
    assert path.read_bytes() == b"\x01" * 4096


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `addr` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_window_buffers_are_private_memory_that_asks_for_huge_pages() -> None:
    """The writer's windows and read-back buffers: private anonymous memory with
    MADV_HUGEPAGE (VmFlags `hg`), so an O_DIRECT write or read of a window pins 8 huge
    pages instead of 4096 small ones; a shared mapping (shmem, `sh`) gets none. The zero
    buffer refuses them (MADV_NOHUGEPAGE, `nh`): where THP is "always" a read fault would
    otherwise map the 2 MiB huge zero page, not the 4 KiB one.

    madvise sets the flag whatever THP's sysfs setting is ("never" included: the kernel's
    hugepage_madvise does not look at it), so only a kernel built without THP, where
    madvise refuses the advice, cannot show it."""
    if not Path("/sys/kernel/mm/transparent_hugepage").exists():
        pytest.skip("this kernel is built without transparent huge pages")
    buf = blockdev.Buffer(16 << 20)
    buf.view[:] = b"\x01" * len(buf.view)
    flags = _vm_flags(buf.addr)
    assert "sh" not in flags and "hg" in flags, flags
    assert buf.addr % blockdev.ALIGN == 0
    zero_flags = _vm_flags(blockdev._zeros.addr)
    assert "sh" not in zero_flags and "nh" in zero_flags and "hg" not in zero_flags, zero_flags
    assert blockdev._zeros.view[: 1 << 20] == bytes(1 << 20)


def test_window_buffers_are_not_inherited_by_a_forked_child() -> None:
    """open(2): O_DIRECT I/O into MAP_PRIVATE memory must not run while the process
    forks, or a read-back can land in the child's copy-on-write copy instead of ours.
    The windows are MADV_DONTFORK (VmFlags `dc`): a child forked mid-stream (say by a
    future preexec_fn) gets no mapping at that address at all. The zero buffer, never an
    I/O target, stays inherited so a forked child can still scan."""
    buf = blockdev.Buffer(4 << 20)
    buf.view[:4096] = b"\x01" * 4096
    assert "dc" in _vm_flags(buf.addr)
    assert "dc" not in _vm_flags(blockdev._zeros.addr)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: wait for the parent's look, touch nothing
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        spans = []
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi))
    finally:
        os.close(w)  # the child's read returns: it exits
        deadline = time.monotonic() + 30
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
    assert spans, "read no mappings of the child"
    assert not any(lo <= buf.addr < hi for lo, hi in spans), f"child maps {buf.addr:#x}"
    zeros = blockdev._zeros.addr
    assert any(lo <= zeros < hi for lo, hi in spans)
