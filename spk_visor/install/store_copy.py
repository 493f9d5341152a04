"""A blob copied into a file as it streams past, hashed on the copying thread.

Deploy keeps the base image's blob, as it came, in the node's OTA store (the installed
node can send the release on to a peer). `StoreCopy` writes it on its own thread
(`image-store`) and takes the blob's sha256 and size there too, so the thread that feeds
the records (deploy's session: receive, decrypt, hand on) does neither. The copy touches
every record anyway and waits for records most of the time; sha256 and write() both
release the GIL, so hashing here costs the stream no serial time. Before this, the
session thread hashed the blob: 0.46 of its 1.1 s handing records on per GiB, while the
decoder waited 0.8 s for records (bench.deploy's `threads`, docs/install-path.md).

Each record is written first and hashed after, from the same buffer. The write copies
the bytes into the file (the page cache) before it returns, so the file holds exactly
what was there before the hash began. If a record's buffer ever changed while the copy
had it (a reused receive buffer), either the file and the hash both saw the change, or
the hash saw it and the file did not: both end in a blob mismatch, never in a file that
differs from the bytes that matched the signed hash. (Hashing first would leave a window
where the hash saw the signed bytes and the file got other ones.)

No copy of a record: the thread writes and hashes the caller's buffer. `put` blocks
while `depth` records are queued or in hand, and records are done in the order they
came, so a record has been let go of before `depth` more puts have returned: the caller
bounds how long its buffers must stay valid with `depth`. A write error stops the copy
(records still drain, so `put` never waits forever); the next `put` or `finish` raises
it, wrapped by `wrap` into the caller's error.

The copy of a regular file is written out to its disk as it grows, on a third thread
(`image-store-out`, `blockdev.write_out` every WRITE_OUT_BYTES): the caller fsyncs the
file before it keeps it, and left to the end that fsync wrote the whole blob (0.4-0.9 s
per 440 MiB blob after the last record of a 1 GiB deploy here, with nothing else left to
do). Done on the copying thread, the same writes blocked it for 0.8-1.4 s per GiB behind
slot A's and, once it held `depth` records, stopped the feeder: on its own thread they
stop nothing, and the copy runs ahead of them through the page cache.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable

from spk_visor.install import blockdev
from spk_visor.install.image import Clock

# Bytes of the copy written out at a time: large enough that the disk sees long writes,
# small enough that little is left for the caller's fsync.
WRITE_OUT_BYTES = 32 << 20


class StoreCopy:
    """Writes and hashes each `put` record to `fd` on the `image-store` thread; `finish`
    returns the blob's (size, sha256 hex) once every record is written."""

    def __init__(self, fd: int, depth: int, wrap: Callable[[BaseException], Exception]) -> None:
        self.fd = fd
        self._depth = depth
        self._wrap = wrap
        self._items: deque[memoryview | None] = deque()
        self._busy = 0  # records queued or in hand
        self._cond = threading.Condition()
        self._finished = False
        self.error: BaseException | None = None
        self.digest = hashlib.sha256()
        self.count = 0  # bytes written and hashed
        self.clock = Clock()  # the store thread: writing and hashing / waiting for records
        self.hash_s = 0.0  # of its busy time, hashing
        self.put_wait = 0.0  # the feeding thread, waiting for room
        self.written_out = 0  # bytes from the start that are on the disk (not flushed)
        self._threads = [threading.Thread(target=self._run, name="image-store", daemon=True)]
        # A pipe or a socket (tests) has no pages to write out.
        if stat.S_ISREG(os.fstat(fd).st_mode):
            name = "image-store-out"
            self._threads.append(threading.Thread(target=self._write_out, name=name, daemon=True))
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        clock = self.clock
        clock.start()
        try:
            while True:
                with self._cond:
                    while not self._items:
                        self._cond.wait()
                    view = self._items.popleft()
                clock.waited()
                if view is None:
                    return
                try:
                    if self.error is None:
                        blockdev.write_all(self.fd, view)
                        t0 = time.perf_counter()
                        self.digest.update(view)  # after the write: see the module's doc
                        self.hash_s += time.perf_counter() - t0
                        with self._cond:
                            self.count += len(view)
                except BaseException as e:  # kept for put/finish; the queue keeps draining
                    self.error = e
                finally:
                    del view  # the caller may reuse the buffer once _busy drops
                    with self._cond:
                        self._busy -= 1
                        self._cond.notify_all()
                clock.worked()
        finally:
            clock.stop()

    def _write_out(self) -> None:
        """Write the copy out WRITE_OUT_BYTES at a time behind the copying thread, until
        the copy is stopped or fails; what is left then is the caller's fsync's (or, on
        an abort, nobody's)."""
        while True:
            with self._cond:
                while not self._finished and self.count - self.written_out < WRITE_OUT_BYTES:
                    self._cond.wait()
                if self._finished or self.error is not None:
                    return
                # One slice at a time, however far the copy got ahead: a stop() (an
                # aborted deploy, whose copy is thrown away) waits for one slice at most.
                start = self.written_out
                end = start + WRITE_OUT_BYTES
            try:
                blockdev.write_out(self.fd, start, end - start)
            except BaseException as e:
                with self._cond:
                    if self.error is None:
                        self.error = e
                return
            with self._cond:
                self.written_out = end

    def _raise(self) -> None:
        if self.error is not None:
            raise self._wrap(self.error)

    def put(self, view: memoryview) -> None:
        self._raise()
        t0 = time.perf_counter()
        with self._cond:
            while self._busy >= self._depth and not self._finished:
                self._cond.wait()
            # Checked after the wait too: a stop() while this waited (the sink closed from
            # another thread) put the end marker in; a record after it would be dropped.
            if self._finished:
                raise ValueError("put after finish")
            self._busy += 1
            self._items.append(view)
            self._cond.notify_all()
        self.put_wait += time.perf_counter() - t0

    def finish(self) -> tuple[int, str]:
        """Wait until every record is written and hashed; the blob's (size, sha256 hex),
        or the copy's error, wrapped."""
        self.stop()
        self._raise()
        return self.count, self.digest.hexdigest()

    def stop(self) -> None:
        """End the thread after the records already put (idempotent)."""
        with self._cond:
            if not self._finished:
                self._finished = True
                self._items.append(None)
                self._cond.notify_all()
        for t in self._threads:
            t.join()

    def figures(self) -> dict[str, float]:
        return {
            **self.clock.figures(),
            "hash_s": self.hash_s,
            "put_wait_s": self.put_wait,
            "written_out_bytes": float(self.written_out),
        }
