"""A pull-repository mirror on 127.0.0.1 that misbehaves at the HTTP framing level.

tests/support/flaky_repo.py misbehaves politely (500s, truncation, slow bodies); this one
attacks the client's parser and clocks. It serves `<root>/v1/...` files over raw sockets
with HTTP/1.0 semantics (one request per connection), except for request paths that
contain `where`, which get `mode`:

    drip_status     the status line, one byte every `interval` s, forever
    drip_headers    a good status line, then one header byte every `interval` s, forever
    stall           read the request, answer nothing, keep the connection open
    endless_headers a good status line, then `X-Pad-N: ...` header lines as fast as taken
    endless_body    200 without Content-Length, then bytes as fast as the client reads
    drip_body       200 with the file's real Content-Length, one byte every `interval` s
    redirect        302 to `location`

Every connection is handled in its own thread; `close()` wakes and ends them all.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import TracebackType

MODES = (
    "drip_status",
    "drip_headers",
    "stall",
    "endless_headers",
    "endless_body",
    "drip_body",
    "redirect",
)


class HostileMirror:
    def __init__(
        self,
        root: Path,
        mode: str,
        where: str,
        interval: float = 0.5,
        location: str = "",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode}")
        self.root = root
        self.mode = mode
        self.where = where
        self.interval = interval
        self.location = location
        self.halt = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.hits = 0  # requests that got the hostile treatment
        self.first_request: float | None = None  # time.monotonic() of the first request
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def __enter__(self) -> HostileMirror:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.halt.set()
        self.accepter.join(timeout=10)
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(timeout=10)
        self.listener.close()

    def _accept(self) -> None:
        while not self.halt.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _read_request(self, conn: socket.socket) -> str:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        return parts[1] if len(parts) >= 2 else "/"

    def _handle(self, conn: socket.socket) -> None:
        try:
            path = self._read_request(conn)
            with self.lock:
                if self.first_request is None:
                    self.first_request = time.monotonic()
            conn.settimeout(30)
            if self.where in path:
                with self.lock:
                    self.hits += 1
                self._hostile(conn, path)
            else:
                self._serve(conn, path)
        except OSError:
            pass
        finally:
            conn.close()

    def _file(self, path: str) -> bytes | None:
        rel = path.split("?", 1)[0].lstrip("/")
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root.resolve()) or not target.is_file():
            return None
        return target.read_bytes()

    def _serve(self, conn: socket.socket, path: str) -> None:
        body = self._file(path)
        if body is None:
            conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)

    def _drip(self, conn: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            if self.halt.wait(self.interval):
                return
            conn.sendall(data[i : i + 1])

    def _hostile(self, conn: socket.socket, path: str) -> None:
        mode = self.mode
        if mode == "drip_status":
            self._drip(conn, b"HTTP/1.1 200 OK" + b" " * 1_000_000)
        elif mode == "drip_headers":
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            self._drip(conn, b"X-Slow: " + b"a" * 1_000_000)
        elif mode == "stall":
            self.halt.wait(3600)
        elif mode == "endless_headers":
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            n = 0
            while not self.halt.is_set():
                conn.sendall(f"X-Pad-{n}: {'a' * 64}\r\n".encode())
                n += 1
        elif mode == "endless_body":
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            block = b"\x00" * 65536
            while not self.halt.is_set():
                conn.sendall(block)
        elif mode == "drip_body":
            body = self._file(path) or b"x" * 4096
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            self._drip(conn, body)
        elif mode == "redirect":
            head = f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\nContent-Length: 0\r\n\r\n"
            conn.sendall(head.encode())
