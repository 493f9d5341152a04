"""A static pull repository on 127.0.0.1 that misbehaves on demand (OSTree/RAUC style).

Serves a directory laid out like the repository (`<root>/v1/...`) over HTTP/1.1 with an
ETag per object (a prefix of its sha256, or a value set by the test), `If-None-Match`
(304), and single `Range` requests (206 + Content-Range, 416, `If-Range`). Faults are
switched on at runtime, for one path (relative to v1/, as the Fetcher names them) or for
every path, for the next `n` requests they apply to or (n=None) until `clear()`:

    fail_500        answer 500
    truncate        announce the whole length, send only part of the body, close
    ignore_range    answer 200 with the whole object even to a Range request
    wrong_content_range   answer a Range request with a 206 one byte off (or its header)
    change_etag_midway    after the next body response the object's ETag changes
    slow_drip       send the body at `rate` bytes/s
    oversize        append bytes to the object (optionally with no Content-Length)
    corrupt         flip one byte of the body
    redirect        answer 302 to the same path under another base URL

Every request is recorded (method, path, headers, status, body bytes sent) in `requests`.
With `tls=self_signed(dir)` it serves https; a client trusts it through SSL_CERT_FILE.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

V1 = "/v1/"


@dataclass
class Seen:
    """One request as the server saw it; header names are lower case."""

    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    sent: int = 0

    @property
    def rel(self) -> str:
        return self.path[len(V1) :] if self.path.startswith(V1) else self.path

    @property
    def range_start(self) -> int | None:
        value = self.headers.get("range", "")
        if not value.startswith("bytes="):
            return None
        return int(value[len("bytes=") :].split("-", 1)[0])


@dataclass
class _Fault:
    kind: str
    rel: str | None
    remaining: int | None
    params: dict[str, Any] = field(default_factory=dict)


def put(root: Path, rel: str, data: bytes) -> Path:
    """Write a repository file `rel` (relative to v1/) under `root`."""
    path = root / "v1" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def put_blob(root: Path, data: bytes) -> str:
    """Publish `data` as a content-addressed blob; returns its id `sha256:<hex>`."""
    digest = hashlib.sha256(data).hexdigest()
    put(root, f"blobs/sha256/{digest}", data)
    return f"sha256:{digest}"


def blob_rel(blob_id: str) -> str:
    return f"blobs/sha256/{blob_id.split(':', 1)[1]}"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FlakyRepo:
    """The server; use as a context manager (`with FlakyRepo(root) as repo:`)."""

    def __init__(self, root: Path, tls: tuple[Path, Path] | None = None) -> None:
        self.root = root
        self.tls = tls
        self.requests: list[Seen] = []
        self._faults: list[_Fault] = []
        self._etags: dict[str, str] = {}
        self._etag_changes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> FlakyRepo:
        repo = self

        class Handler(_Handler):
            pass

        Handler.repo = repo
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Wake handlers sleeping in a slow drip so none outlives the server.
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        """The base URL (the Fetcher appends /v1/<rel>)."""
        assert self._server is not None
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    # -- faults --------------------------------------------------------------------------

    def _add(self, kind: str, rel: str | None, n: int | None, **params: Any) -> None:
        with self._lock:
            self._faults.append(_Fault(kind, rel, n, params))

    def fail_500(self, n: int | None = 1, rel: str | None = None) -> None:
        self._add("fail_500", rel, n)

    def truncate(self, n: int | None = 1, rel: str | None = None, fraction: float = 0.5) -> None:
        self._add("truncate", rel, n, fraction=fraction)

    def ignore_range(self, n: int | None = None, rel: str | None = None) -> None:
        self._add("ignore_range", rel, n)

    def wrong_content_range(
        self, n: int | None = 1, rel: str | None = None, shift_body: bool = True
    ) -> None:
        """206 one byte off: the body too (a server serving the wrong range), or only the
        Content-Range header (a lying header over the right bytes)."""
        self._add("wrong_content_range", rel, n, shift_body=shift_body)

    def change_etag_midway(self, n: int | None = 1, rel: str | None = None) -> None:
        self._add("change_etag_midway", rel, n)

    def slow_drip(self, rate: int, n: int | None = 1, rel: str | None = None) -> None:
        self._add("slow_drip", rel, n, rate=rate)

    def oversize(
        self,
        extra: int = 4096,
        n: int | None = None,
        rel: str | None = None,
        no_length: bool = False,
    ) -> None:
        self._add("oversize", rel, n, extra=extra, no_length=no_length)

    def corrupt(self, offset: int, n: int | None = None, rel: str | None = None) -> None:
        self._add("corrupt", rel, n, offset=offset)

    def redirect(self, to_base: str, n: int | None = None, rel: str | None = None) -> None:
        self._add("redirect", rel, n, to=to_base.rstrip("/"))

    def set_etag(self, rel: str, etag: str) -> None:
        with self._lock:
            self._etags[rel] = etag

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take(self, kind: str, rel: str) -> _Fault | None:
        """The first active fault of `kind` for `rel`, with one use consumed."""
        with self._lock:
            for fault in self._faults:
                if fault.kind == kind and fault.rel in (None, rel):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _has(self, kind: str, rel: str) -> bool:
        with self._lock:
            return any(f.kind == kind and f.rel in (None, rel) for f in self._faults)

    # -- queries -------------------------------------------------------------------------

    def etag(self, rel: str) -> str:
        with self._lock:
            if rel in self._etags:
                return self._etags[rel]
        data = (self.root / "v1" / rel).read_bytes()
        return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'

    def _new_etag(self, rel: str) -> None:
        with self._lock:
            self._etag_changes += 1
            self._etags[rel] = f'"changed-{self._etag_changes}"'

    def seen(self, rel: str | None = None) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if rel is None or r.rel == rel]

    def bytes_sent(self, rel: str | None = None) -> int:
        return sum(r.sent for r in self.seen(rel))


class _Handler(BaseHTTPRequestHandler):
    repo: FlakyRepo
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is `repo.requests`

    def do_GET(self) -> None:
        repo = self.repo
        seen = Seen("GET", self.path, {k.lower(): v for k, v in self.headers.items()})
        with repo._lock:
            repo.requests.append(seen)
        try:
            self._serve(seen)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (too slow, or it was killed): nothing to answer.
            self.close_connection = True

    def _plain(self, seen: Seen, status: int, headers: dict[str, str] | None = None) -> None:
        seen.status = status
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, seen: Seen) -> None:
        repo = self.repo
        rel = seen.rel
        path = (repo.root / "v1" / rel).resolve()
        inside = path.is_relative_to((repo.root / "v1").resolve())
        if not self.path.startswith(V1) or not inside or not path.is_file():
            self._plain(seen, 404)
            return
        if repo._take("fail_500", rel):
            self._plain(seen, 500)
            return
        redirect = repo._take("redirect", rel)
        if redirect:
            self._plain(seen, 302, {"Location": redirect.params["to"] + self.path})
            return
        data = path.read_bytes()
        etag = repo.etag(rel)
        if seen.headers.get("if-none-match") in (etag, "*"):
            self._plain(seen, 304, {"ETag": etag})
            return
        oversize = repo._take("oversize", rel)
        if oversize:
            data += b"\xa5" * oversize.params["extra"]
        corrupt = repo._take("corrupt", rel)
        if corrupt and data:
            at = min(corrupt.params["offset"], len(data) - 1)
            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        total = len(data)
        status, body, headers = 200, data, {"ETag": etag, "Accept-Ranges": "bytes"}
        start = seen.range_start
        if_range = seen.headers.get("if-range")
        if (
            start is not None
            and (if_range is None or if_range == etag)
            and not repo._take("ignore_range", rel)
        ):
            if start >= total:
                self._plain(seen, 416, {"Content-Range": f"bytes */{total}"})
                return
            status, body, label = 206, data[start:], start
            wrong = repo._take("wrong_content_range", rel)
            if wrong:
                label = start + 1  # an off-by-one server
                if wrong.params["shift_body"]:
                    body = data[label:]
            headers["Content-Range"] = f"bytes {label}-{total - 1}/{total}"
        seen.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if oversize and oversize.params["no_length"]:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if repo._take("change_etag_midway", rel):
            repo._new_etag(rel)
        truncate = repo._take("truncate", rel)
        if truncate:
            body = body[: int(len(body) * truncate.params["fraction"])]
            self.close_connection = True
        drip = repo._take("slow_drip", rel)
        self._send(seen, body, drip.params["rate"] if drip else None)
        if truncate:
            # Close now, so the client sees the short body rather than waiting for more.
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, seen: Seen, body: bytes, rate: int | None) -> None:
        view = memoryview(body)
        step = max(1024, rate // 20) if rate else 256 * 1024
        while view:
            if self.repo._stop.is_set():
                self.close_connection = True
                return
            chunk = view[:step]
            self.wfile.write(chunk)
            seen.sent += len(chunk)
            view = view[step:]
            if rate:
                self.wfile.flush()
                self.repo._stop.wait(len(chunk) / rate)
