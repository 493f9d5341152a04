"""One deadline for a whole request: connect, handshake, send and every read of the answer.

A socket timeout bounds each wait, not their sum: a peer that drips a byte now and then
(a hung daemon's half-written answer, or a slow-loris) would keep a request alive for as
long as it likes. `DeadlineSocket` gives every send and receive the time left until one
instant instead, so a node costs at most its own `--timeout` from the moment its request
started, whatever it does. (CPython's ssl module already holds each call on a TLS socket
to one deadline of the socket's timeout; setting that timeout to the time left before each
call completes the bound.)
"""

from __future__ import annotations

import io
import select
import ssl
import time
from typing import Protocol


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; TimeoutError once there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"deadline of {self.seconds:g} s passed")
        return left


class Stream(Protocol):
    """What DeadlineSocket needs of a connection: a socket, a TLS socket, or an adapter
    (an SSH channel's, in transport/ssh.py)."""

    def settimeout(self, value: float | None, /) -> None: ...
    def sendall(self, data: bytes, /) -> None: ...
    def recv_into(self, buffer: memoryview, /) -> int: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


class DeadlineSocket:
    """What http.client sees as its socket: sendall, makefile("rb") and close, each held
    to the current request's deadline (`deadline` is replaced for each request on a
    kept-alive connection).

    Like socket.socket, closing it while a file made by makefile() is still open (http.client
    hands the connection to a response it closes later) defers the real close until that
    file is closed too.
    """

    def __init__(self, sock: Stream, deadline: Deadline) -> None:
        self.sock = sock
        self.deadline = deadline
        self._files = 0
        self._closing = False

    def sendall(self, data: bytes) -> None:
        # sendall's timeout bounds the whole call (Python >= 3.5), not each send.
        self.sock.settimeout(self.deadline.left())
        self.sock.sendall(data)

    def recv_into(self, buffer: memoryview) -> int:
        self.sock.settimeout(self.deadline.left())
        return self.sock.recv_into(buffer)

    def makefile(self, mode: str = "rb", *_args: object, **_kwargs: object) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"DeadlineSocket reads only, not {mode!r}")
        self._files += 1
        return io.BufferedReader(_Reader(self))

    def readable_now(self) -> bool:
        """Whether bytes (or an end of stream) are waiting: on an idle kept-alive
        connection, the peer closed it or sent what nobody asked for."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            # poll, not select: a fleet holds more than FD_SETSIZE (1024) sockets at once.
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def _file_closed(self) -> None:
        self._files -= 1
        if self._closing and self._files <= 0:
            self.sock.close()

    def close(self) -> None:
        self._closing = True
        if self._files <= 0:
            self.sock.close()


class _Reader(io.RawIOBase):
    def __init__(self, owner: DeadlineSocket) -> None:
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self._owner.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._owner._file_closed()
