"""Block devices: exclusive opens, cache drops, whole reads and writes, zeroing, aligned
buffers.

A regular file stands in for a device in tests; every helper works on both."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import stat
import struct
from collections.abc import Iterator

from spk_visor.errors import ConfigError, VerificationError

# linux/fs.h: _IO(0x12, 97), drop the block device's clean cached pages.
BLKFLSBUF = 0x1261
# linux/fs.h: _IO(0x12, 127), zero a byte range {start, length} (both multiples of 512).
BLKZEROOUT = 0x127F
SECTOR = 512
# O_DIRECT offsets, lengths and buffers are multiples of this (512 B and 4 KiB sectors).
ALIGN = 4096
READ_CHUNK = 16 << 20

_libc = ctypes.CDLL(None, use_errno=True)
# libc's memcmp compares two windows without copying them and without the GIL (a
# memoryview comparison goes element by element, 30 times slower).
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
# Not in Python's os module.
_syncfs = _libc.syncfs
_syncfs.argtypes = (ctypes.c_int,)
_syncfs.restype = ctypes.c_int
# Not in Python's os module either.
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_sync_file_range.restype = ctypes.c_int
# SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
_WRITE_OUT = 1 | 2 | 4
# For cached_pages: a file mapping that is never touched, only asked about (Python's mmap
# gives no address for a read-only mapping).
_mmap = _libc.mmap
_mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munmap.restype = ctypes.c_int
_mincore = _libc.mincore
_mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_mincore.restype = ctypes.c_int
PAGE = mmap.PAGESIZE
# mincore's bit 0 is residency; the other bits are reserved.
_RESIDENT = bytes(b & 1 for b in range(256))


# errnos of a BLKZEROOUT the device or its driver does not do (or a file that is not a
# block device): the caller writes the zeros itself instead.
ZEROOUT_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY})


class Buffer:
    """Page-aligned memory (O_DIRECT wants it), and its address for memcmp.

    Private anonymous memory, in transparent huge pages where the kernel has them
    (MADV_HUGEPAGE). Distributions differ in THP's default: Debian and Ubuntu build
    their kernels with "madvise" (no huge pages unless asked for), the kernel's own
    default and RHEL's is "always"; asking makes it the same everywhere. Every O_DIRECT
    write and read-back of a 16 MiB window pins and walks its pages: 8 huge pages
    instead of 4096 small ones. On a loop device the device's one worker then copies
    those pages into and out of the backing file and is the stage every window waits
    for, so that cost is on the critical path: staging 1 GiB was 0.19 s faster (median
    of paired rounds, 12 of 12 faster) with huge pages, and 0.04 s with private memory
    alone (bench.writer_ab; docs/install-path.md "Staging's serial point, and huge pages
    for the windows"). Python's default, a shared anonymous mapping, is shmem, which
    gets no huge pages from MADV_HUGEPAGE.

    The cost: with THP's "defrag" at "madvise" (the kernel's default), a fault on
    memory that asked for huge pages may reclaim and compact memory synchronously
    before it falls back to small pages. A stream's buffers are faulted in as its first
    windows pass: an ImageWriter's 9 windows (144 MiB, 72 huge pages; deploy), plus a
    FileSource's ring of 5 blob pieces (80 MiB; staging: 224 MiB, 112 huge pages). On a
    node whose memory is fragmented or given to VMs those first windows can stall. No
    per-mapping knob bounds this; the node's defrag setting does ("defer": huge pages
    only where free ones are at hand), not measured here.

    I/O buffers (`io`, the default) are also MADV_DONTFORK: open(2) says O_DIRECT I/O
    into MAP_PRIVATE memory must not run while the process forks, or a read-back can
    land in the child's copy-on-write copy and not ours. Subprocesses start with vfork
    today (no preexec_fn), which is safe; a fork (a future preexec_fn, say) would not
    be. The child gets no mapping there at all, so a forked child must not use a Buffer
    made before the fork (an exec'd one never sees it). `io=False` is for memory that is
    only read by memcmp: small pages refused huge ones (MADV_NOHUGEPAGE), and it is
    inherited."""

    def __init__(self, size: int, *, io: bool = True) -> None:
        self.mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # Hints: a kernel without THP (EINVAL) or a Python without the constant keeps
        # small pages, which work the same, only slower; a kernel without MADV_DONTFORK
        # (before 2.6.16) is not one this runs on.
        advice = (mmap.MADV_HUGEPAGE, mmap.MADV_DONTFORK) if io else (mmap.MADV_NOHUGEPAGE,)
        for name in advice:
            with contextlib.suppress(AttributeError, OSError):
                self.mem.madvise(name)
        self.view = memoryview(self.mem)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))


def same(a: Buffer, b: Buffer, n: int) -> bool:
    """The first n bytes of a and b are equal."""
    return int(_memcmp(a.addr, b.addr, n)) == 0


# What zero_runs compares blocks with. A private anonymous mapping never written to reads
# as the kernel's shared zero page, so it costs no memory and stays in the CPU cache: the
# 4 KiB one, as huge pages are refused (where THP is "always" a read fault on a 2 MiB
# aligned range would map the 2 MiB huge zero page instead).
ZERO_SCAN_MAX = 4 << 20
_zeros = Buffer(ZERO_SCAN_MAX, io=False)


def zero_runs(buf: Buffer, n: int, block: int) -> Iterator[tuple[int, int, bool]]:
    """The first n bytes of `buf` as (offset, length, all_zero) runs of whole `block`s
    (the last one may be shorter), adjacent blocks of the same kind coalesced. One memcmp
    per block: a block with data usually differs in its first bytes, a zero block is read
    once at memory speed."""
    if not 0 < block <= ZERO_SCAN_MAX:
        raise ValueError(f"zero scan block {block} is not in 1..{ZERO_SCAN_MAX}")
    start, kind = 0, False
    for at in range(0, n, block):
        zero = int(_memcmp(buf.addr + at, _zeros.addr, min(block, n - at))) == 0
        if at and zero != kind:
            yield start, at - start, kind
            start = at
        kind = zero
    if n:
        yield start, n - start, kind


def zeroout(fd: int, offset: int, length: int) -> None:
    """Zero `length` bytes of the block device `fd` from `offset` (multiples of 512) with
    BLKZEROOUT: the device's WRITE ZEROES where it has one (NVMe Write Zeroes, SCSI WRITE
    SAME, a loop device's fallocate of its backing file), else the kernel writes zero
    pages (SATA disks behind libata, for one). It
    returns when the device has done it; like a write, it is durable after a flush. Raises
    OSError; an errno in ZEROOUT_UNSUPPORTED means "write the zeros yourself"."""
    if offset % SECTOR or length % SECTOR:
        raise ValueError(f"zeroout of {length} bytes at {offset} is not 512-byte aligned")
    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, length))


def open_exclusive(device: str, flags: int, hint: str = "check the configuration") -> int:
    """Open a device exclusively: the kernel refuses (EBUSY) while it is mounted or held.
    `hint` says where the device's name came from, for when it does not exist."""
    try:
        return os.open(device, flags | os.O_EXCL | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"device {device} does not exist", hint) from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise VerificationError(
                f"device {device} is in use (mounted or held)", "unmount it first"
            ) from None
        raise


def open_for_writing(device: str) -> tuple[int, bool]:
    """The device opened exclusively for writing, with O_DIRECT where it allows it
    (four times faster than through the page cache on a loop device here)."""
    try:
        return open_exclusive(device, os.O_RDWR | os.O_DIRECT), True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return open_exclusive(device, os.O_RDWR), False


def set_direct(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)


def mounted(device: str) -> bool:
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return False
    if not stat.S_ISBLK(st.st_mode):
        return False
    want = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[2] == want for line in f if line.strip())


def drop_cache(fd: int) -> None:
    """Make the next read come from the device, not from the pages just written."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        try:
            fcntl.ioctl(fd, BLKFLSBUF, 0)
            return
        except OSError:
            pass
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def cached_pages(fd: int, size: int) -> bytes:
    """Which pages of the first `size` bytes of the regular file `fd` are in the page
    cache now: one byte per page, 1 (cached) or 0 (a read would go to the disk). mincore
    on a mapping that is never touched, so asking reads nothing and caches nothing:
    3-8 ms per GiB here. Linux answers "all cached" where the caller could not
    write the file (neither its owner nor privileged: mincore's side channel rule)."""
    pages = -(-size // PAGE)
    if not pages:
        return b""
    addr = _mmap(None, pages * PAGE, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap for mincore: {os.strerror(err)}")
    try:
        vec = ctypes.create_string_buffer(pages)
        if _mincore(addr, pages * PAGE, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore: {os.strerror(err)}")
    finally:
        _munmap(addr, pages * PAGE)
    return vec.raw.translate(_RESIDENT)


def flush(fd: int) -> None:
    """fsync, then drop the cached pages: durable, and the next read comes from the media."""
    os.fsync(fd)
    drop_cache(fd)


def sync(*paths: str | os.PathLike[str]) -> None:
    """Make what was written to these block devices, and to the filesystems holding these
    paths, durable; nothing else. os.sync() waits for every disk of the machine, and on
    a busy one that is most of the time it takes."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if stat.S_ISBLK(os.fstat(fd).st_mode):
                os.fsync(fd)  # the device's cached pages, then its write cache
            elif _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs {os.fspath(path)}: {os.strerror(err)}")
        finally:
            os.close(fd)


def write_out(fd: int, offset: int, length: int) -> None:
    """Write this range of a file's dirty pages to its device and wait for it: no journal
    commit and no flush of the device's cache (an fsync after it does those, and has
    only the rest left to write). Raises OSError (EIO: the device failed the writes)."""
    if _sync_file_range(fd, offset, length, _WRITE_OUT) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset`; fewer bytes only at the end of the device."""
    n = 0
    while n < len(view):
        got = os.preadv(fd, [view[n:]], offset + n)
        if not got:
            break
        n += got
    return n


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (a short write is continued, never ignored)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"write of {len(view)} bytes at {offset} made no progress")
        view, offset = view[n:], offset + n


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until all of `data` is written."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, f"write of {len(view)} bytes made no progress")
        view = view[n:]


def zero_head(device: str, length: int | None = None, *, exclusive: bool = True) -> None:
    """Zero the device's first `length` bytes (all of it for None), durably: no
    filesystem or boot code there any more. `exclusive=False` for undoing a failed
    install, where a udev probe holding the device must not stop the wipe."""
    flags = os.O_WRONLY | os.O_CLOEXEC
    fd = open_exclusive(device, os.O_WRONLY) if exclusive else os.open(device, flags)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        pwrite_all(fd, bytes(size if length is None else min(length, size)), 0)
        flush(fd)
    finally:
        os.close(fd)


def hash_fd(fd: int, size: int) -> tuple[str, int]:
    """sha256 of the first `size` bytes of `fd`, and how many bytes there were."""
    digest = hashlib.sha256()
    buf = Buffer(READ_CHUNK)
    pos = 0
    while pos < size:
        n = pread_into(fd, buf.view[: min(READ_CHUNK, size - pos)], pos)
        if n == 0:
            break
        digest.update(buf.view[:n])
        pos += n
    return digest.hexdigest(), pos
