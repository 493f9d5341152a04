"""Who gets a worker thread: per-source connection caps, a deadline on each request head,
and an overflow lane that answers everyone else without a thread each.

Slowloris (issue 11): a client that opens connections and never finishes a request ties
up a worker thread per connection. A per-recv socket timeout does not stop one that
sends a byte every few seconds. Three rules bound what one client can take:

- Deadline: the idle wait before a request plus its whole head (request line and
  headers; a TLS handshake too) must end within `head_timeout` seconds, however the
  bytes trickle in. One watchdog thread ends the connections that overrun.
- Caps: at most `per_source` connections of one source address (one /64 for IPv6) hold
  a worker; `max_connections` in all.
- Overflow: a connection past either cap goes to one thread that reads its request head
  without blocking, answers the routes that need no token (GET /api/health: the OTA
  probation and the dashboard's dot depend on it) and gives anything else a 503.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# How long the overflow lane waits for a request head, and how much of it it reads.
OVERFLOW_WAIT = 2.0
OVERFLOW_HEAD_BYTES = 8192
# Sockets the overflow lane holds at once; past it new ones are closed unanswered.
OVERFLOW_LIMIT = 4096
# How long after a deadline the watchdog ends a connection. The worker bounds each read
# by the deadline itself and answers 408; the watchdog is the backstop for a client that
# trickles a byte per read, and must not get there first: its shutdown reads as
# end-of-stream under TLS, after which no 408 can be written.
BACKSTOP_GRACE = 1.0


def source_of(address: str) -> str:
    """The unit a cap counts: the IPv4 address, or the /64 of an IPv6 one (a single host
    commonly holds a whole /64)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", maxsplit=1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class Admission:
    """Counts of connections holding a worker, in all and per source."""

    def __init__(self, max_connections: int, per_source: int) -> None:
        self.max_connections = max_connections
        self.per_source = per_source
        self._lock = threading.Lock()
        self._total = 0
        self._by_source: dict[str, int] = {}

    def enter(self, source: str) -> bool:
        with self._lock:
            held = self._by_source.get(source, 0)
            if self._total >= self.max_connections or held >= self.per_source:
                return False
            self._total += 1
            self._by_source[source] = held + 1
            return True

    def leave(self, source: str) -> None:
        with self._lock:
            self._total -= 1
            held = self._by_source.get(source, 1) - 1
            if held:
                self._by_source[source] = held
            else:
                self._by_source.pop(source, None)  # no entry per address ever seen

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self._total, len(self._by_source)


@dataclass(eq=False)
class Watch:
    """One connection under the watchdog. `due` is its current deadline (None: none)."""

    sock: socket.socket
    due: float | None = None
    queued: bool = False
    fired: bool = False


@dataclass
class Deadlines:
    """One thread that ends connections whose deadline passed.

    The worker sees the deadline first, as a read timeout (`remaining`); this thread acts
    BACKSTOP_GRACE later, on a connection whose reads each returned in time.
    It calls shutdown() on a duplicate of the connection's socket: that wakes the worker's
    blocked recv with end-of-file, on a plain socket or under a TLS wrap (the duplicate
    stays valid when wrap_socket takes over the original). Each connection has at most one
    entry in the heap: a later deadline only updates `due`, and the entry is re-queued
    when it comes up early. Arming costs a lock and an attribute per request.
    """

    _lock: threading.Condition = field(default_factory=threading.Condition)
    _heap: list[tuple[float, int, Watch]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _thread: threading.Thread | None = None
    _stopped: bool = False

    def watch(self, sock: socket.socket) -> Watch:
        return Watch(sock.dup())

    def arm(self, w: Watch, seconds: float) -> None:
        due = time.monotonic() + seconds
        with self._lock:
            w.due = due
            if not w.queued:
                w.queued = True
                heapq.heappush(self._heap, (due + BACKSTOP_GRACE, next(self._seq), w))
                if self._heap[0][2] is w:
                    self._lock.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()

    def remaining(self, w: Watch) -> float | None:
        """Seconds left before the deadline (None: none armed); no lock, one read."""
        due = w.due
        return None if due is None else max(0.0, due - time.monotonic())

    def disarm(self, w: Watch) -> bool:
        """Stop watching; True when the deadline had already ended the connection."""
        with self._lock:
            w.due = None
            return w.fired

    def release(self, w: Watch) -> None:
        with self._lock:
            w.due = None
            w.fired = True  # a queued entry must not touch the closed socket
            w.sock.close()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()

    def _run(self) -> None:
        with self._lock:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, _, w = heapq.heappop(self._heap)
                    w.queued = False
                    if w.fired or w.due is None:
                        continue
                    if w.due + BACKSTOP_GRACE > now:
                        w.queued = True
                        heapq.heappush(self._heap, (w.due + BACKSTOP_GRACE, next(self._seq), w))
                        continue
                    w.fired = True
                    # The read side only: the worker wakes with end-of-file and can still
                    # write its 408 on a plain socket (under TLS the stream is over).
                    with contextlib.suppress(OSError):
                        w.sock.shutdown(socket.SHUT_RD)
                wait = self._heap[0][0] - now if self._heap else None
                self._lock.wait(timeout=wait)


Answer = Callable[[bytes], bytes]


class Overflow:
    """The connections no worker takes: one thread, one selector, no per-socket thread.

    Each socket gets OVERFLOW_WAIT seconds to send its request head; then `answer(head)`
    gives the bytes to send (a full HTTP response with Connection: close) and the socket
    is closed. The accept thread only queues sockets here: it never waits on a client.
    """

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._incoming: deque[socket.socket] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._held = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.refused = 0  # sockets closed unanswered because the lane was full

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            if self._held >= OVERFLOW_LIMIT:
                self.refused += 1
                full = True
            else:
                self._held += 1
                full = False
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="overflow", daemon=True)
                    self._thread.start()
        if full:
            _close(sock)
            return
        self._incoming.append(sock)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        # socket -> (deadline, bytes so far); dicts keep insertion (= deadline) order.
        pending: dict[socket.socket, tuple[float, bytes]] = {}
        while True:
            timeout = None
            if pending:
                timeout = max(0.0, next(iter(pending.values()))[0] - time.monotonic())
            for key, _ in sel.select(timeout):
                sock = key.fileobj
                if sock is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                if not isinstance(sock, socket.socket):
                    continue
                due, head = pending[sock]
                try:
                    chunk = sock.recv(OVERFLOW_HEAD_BYTES)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                head += chunk
                if not chunk or b"\r\n\r\n" in head or b"\n\n" in head:
                    self._finish(sel, pending, sock, head if chunk else b"")
                elif len(head) >= OVERFLOW_HEAD_BYTES:
                    self._finish(sel, pending, sock, head)
                else:
                    pending[sock] = (due, head)
            while self._incoming:
                sock = self._incoming.popleft()
                try:
                    sock.setblocking(False)
                    sel.register(sock, selectors.EVENT_READ)
                except (OSError, ValueError):
                    self._done(sock)
                    continue
                pending[sock] = (time.monotonic() + OVERFLOW_WAIT, b"")
            now = time.monotonic()
            for sock in [s for s, (due, _) in pending.items() if due <= now]:
                self._finish(sel, pending, sock, b"")

    def _finish(
        self,
        sel: selectors.BaseSelector,
        pending: dict[socket.socket, tuple[float, bytes]],
        sock: socket.socket,
        head: bytes,
    ) -> None:
        del pending[sock]
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(sock)
        if head:
            try:
                data = self._answer(head)
                # The answer is small: it fits the socket's send buffer in one call.
                sock.send(data)
            except Exception:
                log.exception("overflow answer failed")
        self._done(sock)

    def _done(self, sock: socket.socket) -> None:
        _close(sock)
        with self._lock:
            self._held -= 1


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    sock.close()
