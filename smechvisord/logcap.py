"""Keep a file that another process appends to within a disk budget, without moving
anything: the oldest part is deallocated in place (fallocate PUNCH_HOLE, KEEP_SIZE).

Used for a VM's logs (serial, vmm.log, events.jsonl: vms.CAPPED_LOGS). cloud-hypervisor
writes `--serial file=` through its own file offset, so the file cannot be truncated or
rotated under it (the next write would land at the old offset, and the file would keep
its size anyway); a punched hole keeps every offset and size as they were, reads as NUL
bytes, and costs no disk. Readers skip the hole with SEEK_DATA (first_data)."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from typing import Any

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4096


@functools.cache
def _fallocate() -> Any:
    """libc's fallocate(2), looked up at first use: a libc without it costs the cap, not
    the daemon's start (drop_head raises OSError)."""
    try:
        func = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError) as e:
        raise OSError(errno.ENOSYS, f"no fallocate in libc: {e}") from None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


def disk_usage(path: str) -> tuple[int, int]:
    """(size, bytes allocated on disk) of `path`; raises OSError."""
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def drop_head(path: str, keep: int) -> int:
    """Deallocate all but about the last `keep` bytes of `path` (block aligned): the
    bytes dropped, 0 when it is already small. Raises OSError (EOPNOTSUPP on a file
    system without hole punching)."""
    size = os.stat(path).st_size
    end = (size - keep) // BLOCK * BLOCK
    if end <= 0:
        return 0
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if _fallocate()(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, end) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)
    return end


def first_data(fd: int, offset: int, size: int) -> int:
    """The first offset at or after `offset` that holds data (past a dropped head);
    `size` when none does. File systems without SEEK_DATA have no holes to skip."""
    if offset >= size:
        return offset
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # only a hole from here to the end
            return size
        return offset
