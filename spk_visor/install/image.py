"""The image writer: a signed base image, decoded onto a block device and proven there.

OTA feeds it from a stored blob (a FileSource), deploy from the records of its channel
(a RecordPipe). Either way:

    read       (OTA only: FileSource's reader) the stored blob, 16 MiB a read: through
               the page cache where it is cached, O_DIRECT where it is not
    blob       sha256 and count of the encoded blob, beside the decoder: OTA on
               FileSource's hasher as it hands each piece on, deploy on its store copy's
               thread as it writes each record (install/store_copy.py), so deploy's
               session thread only receives, decrypts and hands records on
    decode     (the caller's thread; deploy: its decoding thread) zstd, bounded by
               raw_size, straight into page-aligned windows (no copy between decoder
               and device)
    hash       (own thread) sha256 of the raw stream, window by window, in order
    write      (own thread) each window with O_DIRECT where the device allows it; its
               runs of zero blocks (ZERO_BLOCK) with BLKZEROOUT instead, see below
    check      (own thread) read the window back from the device and memcmp it with what
               was written, while the writer is already writing the next window
    sync       (own thread) fdatasync every SYNC_BYTES of checked windows, so writeback
               overlaps the stream instead of stopping it once per window; what it has
               flushed is reported as durable

Each thread does one job, so the stream runs at the speed of its slowest stage (zstd, on
one core) rather than the sum of them: sha256, zstd (python-zstandard's stream reader),
memcmp (through ctypes) and the I/O calls all release the GIL. Each thread keeps a Clock
(busy, waiting, CPU and run-queue seconds; `ImageWriter.figures()`), which bench/ prints:
it shows whether a stream waits for a stage or for a CPU.

The first MiB (where ext4, XFS, btrfs and FAT keep their superblocks) and an unaligned tail
are held in memory: `write_ends` writes them only after the whole stream matched both
signed hashes, and `check_ends` reads them back. Until then the device carries no
mountable filesystem, so an interrupted or refused write leaves it unbootable.

Zero runs (a filesystem image's free space) are not written but zeroed: the writer finds
runs of all-zero ZERO_BLOCK blocks in each window (memcmp against a zero buffer) and
hands them to the device with BLKZEROOUT, which the device does as WRITE ZEROES or the
kernel as writes of zero pages. Where the device refuses the ioctl (EOPNOTSUPP, EINVAL,
ENOTTY) or the target is a regular file, zeros are written like data for the rest of the
stream. Nothing about the proof changes: the window in memory holds those zeros, the raw
sha256 covers them, the checker reads the zeroed ranges back from the device and
compares them like the rest, and the syncer's fdatasync flushes them like writes.

Why no second pass: sha256(stream) == raw_sha256 and device == stream (every window, head
and tail compared byte for byte after a flush) prove what sha256(device) == raw_sha256
proves, with one sha256 pass over the raw image instead of two.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import zstandard

from spk_visor.errors import VerificationError
from spk_visor.install import blockdev
from spk_visor.trust.manifest import ImageComponent

MIB = 1 << 20
# Held back during the stream and written last; also what invalidation zeroes.
HEAD = MIB
# One window: decoded, hashed, written, flushed, read back and compared as a unit.
# Large, so Python does little per byte and the device sees few flushes.
CHUNK = 16 * MIB
# Windows in flight: one being decoded, one written, one checked, and five the decoder
# can fill while a flush holds up the device. On a buffered loop device a flush (an
# fsync of the backing file) stalls every write and read-back queued behind it (115-175
# ms a flush of 128 MiB, bench.writer_trace); with 4 windows the decoder (25-30 ms a
# window) ran out of free windows in each flush and waited 0.5-0.9 s per GiB. Costs
# 64 MiB more memory than 4 windows. Measured with SYNC_BYTES below, see there and
# docs/install-path.md "Flush interval and windows".
WINDOWS = 8
# How much of the encoded blob the decoder pulls per read, and a FileSource reads at once.
# Large: an O_DIRECT read has no kernel read-ahead, and a 16 MiB read keeps several
# requests in flight on the disk. At 4 MiB the decoder waited 0.5-1.5 s per GiB for the
# blob under load, at 16 MiB 0.03-0.35 s (bench.ota_slots' `threads`, decode feed_wait_s).
READ_SIZE = 16 * MIB
# A FileSource reads a segment of this size through the page cache where all its pages
# were cached as it opened, else with O_DIRECT (see FileSource): a few runs per piece,
# and a piece of a partly cached blob is not split into thousands of page-sized reads.
CACHED_RUN = MIB
# A FileSource hashes this many READ_SIZE pieces ahead of the decoder...
PREFETCH = 2
# ...and reads this many ahead of its hashing. Its ring: PREFETCH + READ_AHEAD + 2 pieces.
READ_AHEAD = 1
# Checked bytes between two flushes. A flush per window made the stream wait for the
# device's write cache 64 times per GiB (0.54x dd on a loop device); this is the
# granularity of the durable progress, not of the read-back (nothing but progress and
# a test's crash point reads it; the flush that makes the slot bootable is write_ends').
# 64 MiB with 8 windows against 128 MiB with 4 (bench.writer_ab, 1 GiB, stages taking
# turns with dd oflag=direct, 2026-12-06, load 1-4): cold 1.589 s against 1.659 s (10
# rounds) and 1.584 s against 1.681 s (12 rounds), warm 1.620 s against 1.711 s (10
# rounds); faster in 27 of 32 paired rounds, by a median 0.08-0.09 s (5-6 %). 128 MiB with 8
# windows 1.627 s, 64 MiB with 8 windows of 8 MiB 1.669 s, 32 MiB 1.595 s, 10 windows
# 1.61-1.64 s: no better. Flushing only at the end or every 512 MiB is slower (1.96-2.06
# and 1.98 s against 1.80-1.89 s): the stream then waits for a 0.55 s fsync at its end.
SYNC_BYTES = 64 * MIB
# Runs of zeros are found, and zeroed instead of written, in blocks of this size (the
# scan: one memcmp per block). See _write_window and docs/install-path.md.
ZERO_BLOCK = 256 << 10
# zstd's own default limit, stated so a frame cannot ask for more decoder memory.
MAX_WINDOW = 1 << 27
REFUSED_HINT = "the image or its release is corrupt; the slot was left unbootable"


def runqueue_s() -> float:
    """Seconds this thread has waited, runnable, for a CPU (Linux schedstat; 0 without)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class Clock:
    """One thread's time in a stream: `busy` (wall seconds working), `wait` (wall seconds
    blocked on its input, a free buffer or a full queue), `cpu` (its own CPU seconds) and
    `runqueue` (seconds it was ready to run but had no CPU: busy - cpu - runqueue is time
    in I/O calls). A few clock reads per window; bench/ prints them to show where a
    stream waits, and whether it waits for another stage or for a CPU."""

    def __init__(self) -> None:
        self.busy = 0.0
        self.wait = 0.0
        self.cpu = 0.0
        self.runqueue = 0.0
        self._cpu0 = 0.0
        self._rq0 = 0.0
        self._t = time.perf_counter()

    def start(self) -> None:
        self._cpu0 = time.thread_time()
        self._rq0 = runqueue_s()
        self._t = time.perf_counter()

    def waited(self) -> None:
        now = time.perf_counter()
        self.wait += now - self._t
        self._t = now

    def worked(self) -> None:
        now = time.perf_counter()
        self.busy += now - self._t
        self._t = now

    def stop(self) -> None:
        self.cpu += time.thread_time() - self._cpu0
        self.runqueue += runqueue_s() - self._rq0

    def figures(self) -> dict[str, float]:
        return {
            "busy_s": self.busy,
            "wait_s": self.wait,
            "cpu_s": self.cpu,
            "runqueue_s": self.runqueue,
        }


class ImageError(VerificationError):
    """The image was refused; `reason` is machine-readable (deploy's REPORT uses it)."""

    def __init__(self, reason: str, message: str, hint: str = REFUSED_HINT) -> None:
        super().__init__(message, hint)
        self.reason = reason


def _read_back_error(offset: int) -> ImageError:
    return ImageError(
        "read_back",
        f"the slot reads back other bytes than were written at offset {offset}",
        "the slot device may be failing; the slot was left unbootable",
    )


class RecordPipe:
    """Blob bytes handed from a feeding thread to the decoding thread, without copies.

    The blob's sha256 and size, which the writer checks once the stream has ended
    (`blob`), come from one of two places:

    - `hashed=True` (OTA's FileSource): taken here, on the feeding thread, as each piece
      is put, so the hash runs beside the decoder; `close()` fixes them.
    - `hashed=False` (deploy): the feeder has them taken by whatever else reads every
      record (deploy's store copy hashes what it writes, on its own thread, so the
      session thread only hands records on) and passes the final pair to
      `close(blob=...)`. Until then there is none: a stream that ends without it is
      refused as a blob mismatch, never accepted.

    Deploy's channel decrypts into a ring of buffers, so a record's memory stays valid
    for a few more records: `put` blocks while `depth` records are queued or held by the
    decoder, which keeps every record alive until it has been decoded. Records leave in
    the order they came, so a record has been let go of before `depth` more puts have
    returned. A record is held from the read that returns it until the next read (zstd
    asks for more input only once it has consumed the last)."""

    def __init__(self, depth: int, *, hashed: bool = True) -> None:
        self._depth = depth
        self._items: deque[memoryview] = deque()
        self._held = 0
        self._closed = False
        self._dead: BaseException | None = None
        self._broken: BaseException | None = None
        self._cond = threading.Condition()
        self.hashed = hashed
        self.digest = hashlib.sha256() if hashed else None
        self.count = 0
        # (size, sha256 hex) of the whole blob, once the feed has ended.
        self.blob: tuple[int, str] | None = None
        # The feeding thread: busy hashing, waiting for room (its CPU and run-queue
        # seconds only where the pipe runs that thread itself: FileSource).
        self.clock = Clock()
        self.put_wait = 0.0  # the feeding thread, waiting for room
        self.read_wait = 0.0  # the decoding thread, waiting for the feed

    def put(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self.clock.waited()
        if self.digest is not None:
            # Outside the lock: the decoder keeps reading while this hashes.
            self.digest.update(view)
            self.count += len(view)
            self.clock.worked()
        with self._cond:
            if len(self._items) + self._held >= self._depth and self._dead is None:
                t0 = time.perf_counter()
                while len(self._items) + self._held >= self._depth and self._dead is None:
                    self._cond.wait()
                self.put_wait += time.perf_counter() - t0
            self.clock.waited()
            if self._dead is not None:
                raise self._dead
            if self._closed:
                raise ValueError("put after close")
            self._items.append(view)
            self._cond.notify_all()

    def close(
        self, error: BaseException | None = None, *, blob: tuple[int, str] | None = None
    ) -> None:
        """No more records: the decoder sees the end of the stream, or `error` (the feed
        broke) once it has read what came before. `blob`: the whole blob's (size, sha256
        hex) where the pipe does not hash (`hashed=False`); given before the decoder can
        see the end, so the writer's check always has the final pair."""
        if self.digest is not None:
            if blob is not None:
                raise ValueError("a hashing pipe takes the blob's hash itself")
            if error is None:
                blob = (self.count, self.digest.hexdigest())
        with self._cond:
            self.blob = None if error is not None else blob
            self._closed = True
            self._broken = error
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The decoder stopped: `put` raises `error` instead of waiting for it."""
        with self._cond:
            self._dead = error
            self._items.clear()
            self._cond.notify_all()

    def read(self, n: int = -1) -> memoryview | bytes:
        with self._cond:
            self._held = 0
            self._cond.notify_all()
            if not self._items and not self._closed:
                t0 = time.perf_counter()
                while not self._items and not self._closed:
                    self._cond.wait()
                self.read_wait += time.perf_counter() - t0
            if not self._items:
                if self._broken is not None:
                    raise self._broken
                return b""
            view = self._items[0]
            self._held = 1
            if 0 <= n < len(view):
                self._items[0] = view[n:]
                return view[:n]
            self._items.popleft()
            return view

    def readinto(self, buf: memoryview) -> int:
        """For an identity-encoded image, read straight into the window."""
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Take the rest of the feed, up to its end (so `blob` is final): bytes the
        decoder never asked for are hashed and counted too."""
        while self.read(READ_SIZE):
            pass


class FileSource(RecordPipe):
    """A stored blob, read on one thread (`image-blob-read`, READ_AHEAD reads ahead of the
    hashing) and hashed on another (`image-blob`, PREFETCH pieces ahead of the decoder):
    the read from disk, the blob's sha256 and zstd each wait on none of the others. A
    context manager: leaving it stops both threads.

    Each part of the blob is read the cheaper way for where it is now. Which pages are in
    the page cache is asked once, as the source opens (mincore, `blockdev.cached_pages`:
    3-8 ms per GiB here, nothing read), before any read of ours or the kernel's read-ahead
    can cache more:

    - cached (every page of a CACHED_RUN segment): read through the page cache, a copy
      from memory. After `ota pull` the blob it just downloaded and verified is usually
      there; O_DIRECT threw that away and read it from the disk again, on the disk the
      slot's own writes and read-back go to (a loop slot is a file on it): for a 442 MiB
      blob the reader was busy 0.9-1.3 s and read 442 MiB from the disk, through the
      page cache 0.11-0.14 s and nothing (bench.ota_slots, `warm`).
    - not cached: O_DIRECT where the filesystem allows it, so the disk fills the ring's
      buffers itself, with no copy out of the page cache (the reader's CPU: 0.10-0.14
      against 0.19-0.23 seconds per GiB of blob here) and no page cache filled with a
      blob that is read once. Where it
      does not (or refuses a read with EINVAL, from which point it is not tried again):
      through the page cache, with kernel read-ahead, and the pages that were not cached
      before are dropped (POSIX_FADV_DONTNEED) once read.
    The fd reads with POSIX_FADV_RANDOM while O_DIRECT is in use, so a cached segment's
    read does not set off read-ahead into the uncached one after it (8 MiB here).

    What was cached stays cached, what was not is not cached by this read. Where Linux
    will not tell (mincore answers "all cached" to a caller that could not write the
    file), every read goes through the page cache. Hasher and decoder see the same bytes
    either way: both read the one private buffer, which is not reused before the decoder
    has let go of it; the reads for one piece fill that buffer in order."""

    def __init__(self, f: io.RawIOBase) -> None:
        super().__init__(PREFETCH)
        # A piece is in one place at a time: being read (1), read and queued for the
        # hasher (READ_AHEAD), being hashed or waiting for room (1), queued for or held by
        # the decoder (PREFETCH). The ring has one buffer for each, so the reader never
        # overwrites a piece still in use (all pieces move in order). Reused, page-aligned
        # buffers (O_DIRECT wants them) also spare a page fault per 4 KiB of each piece.
        self._ring = [blockdev.Buffer(READ_SIZE) for _ in range(PREFETCH + READ_AHEAD + 2)]
        self.direct = _try_direct(f)
        # Whether the fd has O_DIRECT set now; where the blob's pages were cached as it
        # opened (None: not a regular file, nothing to ask); the file offset next read.
        self._flag = self.direct
        self._cached, self._pos = _cached_at_open(f)
        if self._cached is not None:
            advice = os.POSIX_FADV_RANDOM if self.direct else os.POSIX_FADV_SEQUENTIAL
            _hint(f.fileno(), 0, 0, advice)
        # Bytes read from the page cache where they were cached, with O_DIRECT, and
        # through the page cache where they were not (then dropped).
        self.read_bytes = {"cached": 0, "direct": 0, "uncached": 0}
        self.read_clock = Clock()  # the reading thread: busy in reads, waiting for room
        self._pieces: queue.Queue[memoryview | BaseException | None] = queue.Queue(READ_AHEAD)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._reader, args=(f,), name="image-blob-read"),
            threading.Thread(target=self._pump, name="image-blob"),
        ]
        for t in self._threads:
            t.daemon = True
            t.start()

    def _hand(self, item: memoryview | BaseException | None) -> bool:
        """Queue `item` for the hasher; False once the source is being closed."""
        while not self._stop.is_set():
            try:
                self._pieces.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _reader(self, f: io.RawIOBase) -> None:
        clock = self.read_clock
        clock.start()
        try:
            for i in itertools.count():
                buf = self._ring[i % len(self._ring)].view
                n = self._read(f, buf)
                clock.worked()
                ok = self._hand(buf[:n] if n else None)
                clock.waited()
                if not n or not ok:
                    return
        except BaseException as e:
            self._hand(e)
        finally:
            clock.stop()

    def _pump(self) -> None:
        error: BaseException | None = None
        self.clock.start()
        try:
            while True:
                item = self._pieces.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    error = item
                    break
                self.put(item)
        except _Stopped:
            return
        except BaseException as e:
            error = e
        finally:
            self.clock.stop()
        self.close(error)

    def _read(self, f: io.RawIOBase, buf: memoryview) -> int:
        """Fill `buf` from the blob, run by run (see the class's docstring); fewer bytes
        only at its end."""
        at_open = self._cached
        if at_open is None:
            return self._read_run(f, buf, cached=False)
        n = 0
        for length, cached in self._runs(at_open, len(buf)):
            got = self._read_run(f, buf[n : n + length], cached)
            if not cached and not self._flag:
                _drop_uncached(f.fileno(), at_open, self._pos + n, got)
            n += got
            if got < length:
                break
        self._pos += n
        return n

    def _runs(self, at_open: bytes, size: int) -> Iterator[tuple[int, bool]]:
        """(length, cached) runs of the next `size` bytes, by CACHED_RUN segments."""
        page = blockdev.PAGE
        run_start, run_cached = 0, False
        for at in range(0, size, CACHED_RUN):
            first = (self._pos + at) // page
            pages = at_open[first : first + -(-min(CACHED_RUN, size - at) // page)]
            cached = bool(pages) and 0 not in pages
            if at and cached != run_cached:
                yield at - run_start, run_cached
                run_start = at
            run_cached = cached
        yield size - run_start, run_cached

    def _read_run(self, f: io.RawIOBase, view: memoryview, cached: bool) -> int:
        want = self.direct and not cached
        if want != self._flag:
            blockdev.set_direct(f.fileno(), want)
            self._flag = want
        try:
            n = f.readinto(view) or 0
        except OSError as e:
            # A filesystem that took the flag but refuses an aligned read: read through
            # the page cache from here on (the position is unchanged after EINVAL), with
            # read-ahead.
            if e.errno != errno.EINVAL or not self._flag:
                raise
            self.direct = self._flag = False
            blockdev.set_direct(f.fileno(), False)
            _hint(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            n = f.readinto(view) or 0
        kind = "cached" if cached else "direct" if self._flag else "uncached"
        self.read_bytes[kind] += n
        return n

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fail(_Stopped())
        self._stop.set()
        reader, pump = self._threads
        reader.join()
        # The reader, stopped, queues nothing more: the hasher may be waiting for a piece
        # that never comes. Wake it (a full queue wakes it by itself: its next piece
        # meets the stopped pipe).
        with contextlib.suppress(queue.Full):
            self._pieces.put_nowait(None)
        pump.join()


def _hint(fd: int, offset: int, length: int, advice: int) -> None:
    """posix_fadvise as the hint it is: a filesystem that refuses one only loses the
    read-ahead or the cache tidying it asked for, never the stream."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, advice)


def _try_direct(f: io.RawIOBase) -> bool:
    """Set O_DIRECT on a regular file opened unbuffered at a block boundary; False where
    the file (a pipe, a test's stand-in, tmpfs before Linux 6.6) does not allow it."""
    try:
        fd = f.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.lseek(fd, 0, os.SEEK_CUR) % blockdev.ALIGN:
            return False
        blockdev.set_direct(fd, True)
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    return True


def _cached_at_open(f: io.RawIOBase) -> tuple[bytes | None, int]:
    """Which pages of the regular file `f` are cached (blockdev.cached_pages), and its
    offset; (None, 0) for anything else (a pipe, a test's stand-in)."""
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, 0
        return blockdev.cached_pages(fd, st.st_size), os.lseek(fd, 0, os.SEEK_CUR)
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None, 0


def _drop_uncached(fd: int, at_open: bytes, offset: int, length: int) -> None:
    """Drop from the page cache what a read brought into it: the pages in
    [offset, offset + length) that were not cached when the source opened (`at_open`)."""
    page = blockdev.PAGE
    at, end = offset // page, -(-(offset + length) // page)
    while at < end:
        gap = at_open.find(0, at, end)
        if gap < 0:
            return
        stop = at_open.find(1, gap, end)
        stop = end if stop < 0 else stop
        _hint(fd, gap * page, (stop - gap) * page, os.POSIX_FADV_DONTNEED)
        at = stop


class _Stopped(Exception):
    """The decoder is done with a FileSource; its reader stops."""


@dataclass
class _Piece:
    """Decoded bytes on their way to the hasher and, for the body, the writer."""

    view: memoryview
    offset: int
    buf: blockdev.Buffer | None = None  # a window to recycle; None for head and tail
    users: int = 1


class ImageWriter:
    """Writes one image to an open device `fd` (see the module's docstring).

    `progress(bytes)` runs on the decoding thread after each window is handed on;
    `on_durable(bytes)` on the syncing thread after each flush, with the body bytes
    that were read back identical before it. Refusals raise ImageError; I/O errors
    raise OSError."""

    def __init__(
        self,
        fd: int,
        direct: bool,
        image: ImageComponent,
        blob_size: int,
        *,
        progress: Callable[[int], None] | None = None,
        on_durable: Callable[[int], None] | None = None,
    ) -> None:
        self.fd = fd
        self.direct = direct
        self.image = image
        self.blob_size = blob_size
        self.progress = progress
        self.on_durable = on_durable
        self.chunk = CHUNK
        self.digest = hashlib.sha256()
        self.written = 0  # bytes of body written and read back identical
        self.durable = 0  # of those, flushed
        # How the body reached the device: pwrite (data, and zeros where the device
        # takes no BLKZEROOUT) or BLKZEROOUT (runs of zero blocks).
        self.written_bytes = 0
        self.zeroed_bytes = 0
        self._zeroout = stat.S_ISBLK(os.fstat(fd).st_mode)
        self._sync = threading.Condition()
        self._sync_stop = False
        self.head = bytearray()
        self.tail = bytearray()
        self._errors: list[BaseException] = []
        self._feed: RecordPipe | None = None
        self.stream_s = 0.0
        self._cancelled = False
        self._lock = threading.Lock()
        self._free: queue.Queue[blockdev.Buffer] = queue.Queue()
        self._check = blockdev.Buffer(self.chunk)
        for _ in range(WINDOWS):
            self._free.put(blockdev.Buffer(self.chunk))
        self._to_hash: queue.Queue[_Piece | None] = queue.Queue()
        self._to_write: queue.Queue[_Piece | None] = queue.Queue()
        self._to_check: queue.Queue[_Piece | None] = queue.Queue()
        self.clocks = {name: Clock() for name in ("decode", "hash", "write", "check", "sync")}
        self._threads = [
            threading.Thread(target=self._hasher, name="image-hash", daemon=True),
            threading.Thread(target=self._writer, name="image-write", daemon=True),
            threading.Thread(target=self._checker, name="image-check", daemon=True),
            threading.Thread(target=self._syncer, name="image-sync", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- the threads

    def _done(self, piece: _Piece) -> None:
        with self._lock:
            piece.users -= 1
            last = piece.users == 0
        if last and piece.buf is not None:
            self._free.put(piece.buf)

    def _failed(self) -> bool:
        return bool(self._errors) or self._cancelled

    def _hasher(self) -> None:
        clock = self.clocks["hash"]
        clock.start()
        while (piece := self._to_hash.get()) is not None:
            clock.waited()
            try:
                if not self._failed():
                    self.digest.update(piece.view)
            except BaseException as e:
                self._errors.append(e)
            finally:
                self._done(piece)
                clock.worked()
        clock.stop()

    def _writer(self) -> None:
        # After an error (or a cancel) it keeps taking pieces without working on them, so
        # every buffer comes back and the decoder never waits forever for one.
        clock = self.clocks["write"]
        clock.start()
        while (piece := self._to_write.get()) is not None:
            clock.waited()
            handed_on = False
            try:
                if not self._failed():
                    self._write_window(piece)
                    self._to_check.put(piece)
                    handed_on = True
            except BaseException as e:
                self._errors.append(e)
            finally:
                if not handed_on:
                    self._done(piece)
                clock.worked()
        clock.stop()
        self._to_check.put(None)

    def _write_window(self, piece: _Piece) -> None:
        """Write a window: its data with pwrite, its runs of zero blocks with BLKZEROOUT
        while the device takes it (the checker reads both back all the same)."""
        if not self._zeroout or piece.buf is None:
            blockdev.pwrite_all(self.fd, piece.view, piece.offset)
            self.written_bytes += len(piece.view)
            return
        for at, n, zero in blockdev.zero_runs(piece.buf, len(piece.view), ZERO_BLOCK):
            if zero and self._zeroout:
                try:
                    blockdev.zeroout(self.fd, piece.offset + at, n)
                    self.zeroed_bytes += n
                    continue
                except OSError as e:
                    if e.errno not in blockdev.ZEROOUT_UNSUPPORTED:
                        raise
                    # Not this device: its zeros are written like data from here on.
                    self._zeroout = False
            blockdev.pwrite_all(self.fd, piece.view[at : at + n], piece.offset + at)
            self.written_bytes += n

    def _checker(self) -> None:
        clock = self.clocks["check"]
        clock.start()
        while (piece := self._to_check.get()) is not None:
            clock.waited()
            try:
                if not self._failed():
                    self._check_window(piece)
            except BaseException as e:
                self._errors.append(e)
            finally:
                self._done(piece)
                clock.worked()
        clock.stop()

    def _check_window(self, piece: _Piece) -> None:
        if piece.buf is None:
            raise RuntimeError("only windows go to the writer")
        n = len(piece.view)
        # An O_DIRECT read is the device's answer, with no page cache in between; a flush
        # first would not change that answer (a drive serves reads from its own cache
        # after a flush as well), only make the stream wait for it. Without O_DIRECT the
        # page cache holds the window: flush it and drop it, then read.
        if not self.direct:
            os.fdatasync(self.fd)
            os.posix_fadvise(self.fd, piece.offset, n, os.POSIX_FADV_DONTNEED)
        got = blockdev.pread_into(self.fd, self._check.view[:n], piece.offset)
        if got != n or not blockdev.same(piece.buf, self._check, n):
            raise _read_back_error(piece.offset)
        with self._sync:
            self.written += n
            if self.written - self.durable >= SYNC_BYTES:
                self._sync.notify()

    def _syncer(self) -> None:
        """Flush what was checked every SYNC_BYTES, and once more at the end."""
        clock = self.clocks["sync"]
        clock.start()
        try:
            while True:
                with self._sync:
                    while not self._sync_stop and self.written - self.durable < SYNC_BYTES:
                        self._sync.wait()
                    upto, last = self.written, self._sync_stop
                clock.waited()
                if upto > self.durable and not self._failed():
                    try:
                        os.fdatasync(self.fd)
                    except BaseException as e:
                        self._errors.append(e)
                        return
                    with self._sync:
                        self.durable = upto
                    if self.on_durable is not None:
                        self.on_durable(upto)
                clock.worked()
                if last:
                    return
        finally:
            clock.stop()

    def _submit(self, piece: _Piece, write: bool) -> None:
        if self._errors:
            if piece.buf is not None:
                self._free.put(piece.buf)
            raise self._errors[0]
        piece.users = 2 if write else 1
        self._to_hash.put(piece)
        if write:
            self._to_write.put(piece)

    def _close(self) -> None:
        self._to_hash.put(None)
        self._to_write.put(None)
        hasher, writer, checker, syncer = self._threads
        for t in (hasher, writer, checker):
            t.join()
        with self._sync:  # every check is done: the last flush
            self._sync_stop = True
            self._sync.notify()
        syncer.join()

    # -- the stream

    def _blob_mismatch(self, source: RecordPipe) -> str | None:
        """Only after the feed has ended (the decoder saw its end or drained it), when
        `source.blob` is final."""
        if source.blob is None:
            return "base image blob ended without its size and hash"
        count, got = source.blob
        if count != self.blob_size:
            return f"base image blob has {count} bytes, its signed size is {self.blob_size}"
        if got != self.image.blob.removeprefix("sha256:"):
            return f"base image blob does not match its signed hash (got {got[:12]}…)"
        return None

    def _refuse(self, source: RecordPipe, reason: str, what: str) -> ImageError:
        """A bad blob explains everything after it: it is reported first."""
        source.drain()
        mismatch = self._blob_mismatch(source)
        return ImageError("blob_hash", mismatch) if mismatch else ImageError(reason, what)

    def stream(self, blob: RecordPipe) -> None:
        """Decode `blob` onto the device, except its head and unaligned tail (kept for
        write_ends). Raises ImageError unless the blob matched its signed hash and size,
        the decoded stream is exactly raw_size bytes with sha256 raw_sha256, and every
        written window read back identical."""
        image = self.image
        raw_size = image.raw_size
        head_len = min(HEAD, raw_size)
        body_end = head_len + (raw_size - head_len) // blockdev.ALIGN * blockdev.ALIGN
        source = blob
        reader: Any = source
        if image.encoding == "zstd":
            dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
            reader = dctx.stream_reader(
                cast("BinaryIO", source),
                read_size=READ_SIZE,
                read_across_frames=True,
                closefd=False,
            )

        def fill(view: memoryview) -> int:
            n = 0
            while n < len(view):
                try:
                    got = reader.readinto(view[n:])
                except zstandard.ZstdError as e:
                    raise self._refuse(
                        source, "bad_image", f"base image does not decode: {e}"
                    ) from None
                if not got:
                    break
                n += got
            return n

        clock = self.clocks["decode"]
        clock.start()
        t0 = time.perf_counter()
        try:
            self.head = bytearray(head_len)
            decoded = fill(memoryview(self.head))
            self._submit(_Piece(memoryview(self.head)[:decoded], 0), write=False)
            while decoded < body_end and decoded % blockdev.ALIGN == 0:
                clock.worked()
                buf = self._free.get()
                clock.waited()
                want = min(self.chunk, body_end - decoded)
                n = fill(buf.view[:want])
                # A short window means a short stream, refused below; it is not written.
                self._submit(_Piece(buf.view[:n], decoded, buf), write=n == want)
                decoded += n
                if self.progress is not None:
                    self.progress(self.written)
                if n < want:
                    break
            self.tail = bytearray(raw_size - body_end if decoded == body_end else 0)
            n = fill(memoryview(self.tail))
            self._submit(_Piece(memoryview(self.tail)[:n], decoded), write=False)
            decoded += n
            if decoded == raw_size and fill(memoryview(bytearray(1))):
                raise self._refuse(
                    source,
                    "image_too_large",
                    f"base image decodes to more than its signed raw_size {raw_size}",
                )
            source.drain()
            clock.worked()
        except BaseException:
            self._cancelled = True  # nothing more gets written
            raise
        finally:
            clock.stop()
            self._close()
            self.stream_s = time.perf_counter() - t0
            self._feed = source
        if self._errors:
            raise self._errors[0]
        problem = self._blob_mismatch(source)
        if problem:
            raise ImageError("blob_hash", problem)
        if decoded != raw_size:
            raise ImageError(
                "bad_image",
                f"base image decodes to {decoded} bytes, its signed raw_size is {raw_size}",
            )
        if self.digest.hexdigest() != image.raw_sha256:
            raise ImageError(
                "image_hash", "decoded base image does not match its signed raw_sha256"
            )

    def figures(self) -> dict[str, dict[str, float]]:
        """Each stage's Clock after `stream` (the decoder's busy time includes its waits
        for the feed, given apart as `feed_wait_s`), and the stream's wall time."""
        out = {name: c.figures() for name, c in self.clocks.items()}
        feed = self._feed
        if feed is not None:
            out["decode"]["feed_wait_s"] = feed.read_wait
            # A pipe that does not hash runs no clock of its own (deploy: the hash is in
            # its store copy's figures); either way, how long the feeder waited for room.
            blob = feed.clock.figures() if feed.hashed else {}
            out["blob"] = {**blob, "put_wait_s": feed.put_wait}
            if isinstance(feed, FileSource):
                out["blob-read"] = feed.read_clock.figures()
        out["stream"] = {"wall_s": self.stream_s}
        out["bytes"] = {"written_bytes": self.written_bytes, "zeroed_bytes": self.zeroed_bytes}
        return out

    def write_ends(self) -> None:
        """After a verified stream: the tail, then the head, written and fsynced."""
        os.fsync(self.fd)
        if self.direct:  # head and tail sit in ordinary memory, the tail has any length
            blockdev.set_direct(self.fd, False)
        blockdev.pwrite_all(self.fd, self.tail, self.image.raw_size - len(self.tail))
        blockdev.pwrite_all(self.fd, self.head, 0)
        os.fsync(self.fd)

    def check_ends(self) -> None:
        """Head and tail read back from the device (caches dropped) and compared."""
        blockdev.drop_cache(self.fd)
        for data, at in ((self.head, 0), (self.tail, self.image.raw_size - len(self.tail))):
            back = bytearray(len(data))
            if blockdev.pread_into(self.fd, memoryview(back), at) != len(data) or back != data:
                raise _read_back_error(at)
