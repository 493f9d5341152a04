"""The HTTP(S) transport against servers that misbehave on purpose: scripted answers on a
loopback socket (plain or TLS), each written the way a broken or hostile peer would.

What must hold: a pinned certificate that does not match gets no byte of the request (so
no token); bodies are capped whatever their framing; a body shorter than its
Content-Length is an error, not a truncated document; the deadline of a request is its
total time, however slowly the peer drips; redirects are not followed; a kept-alive
connection the peer left in a bad state is not read from again.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spk_visor.errors import CertificateError, ExitCode, TransportError
from spk_visor.transport import tls_pinning
from spk_visor.transport.base import MAX_RESPONSE_BYTES
from spk_visor.transport.http import HttpTransport
from tests.support import cli

TOKEN = "0123456789abcdef0123456789abcdef"
JSON_BODY = b'{"status": "ok", "version": "test"}'
Handler = Callable[[socket.socket], None]


class Scripted:
    """A loopback server that runs `handler` on each accepted connection (in a thread of
    its own), after a TLS handshake when given a context. Counts connections and keeps
    every byte the handler read, to show what a client did or did not send."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.stop = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                self.conns.append(conn)
            self.handler(conn)
        except OSError:
            pass  # the client hung up: that is often the point
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self._accepter.join(timeout=5)
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()
        for thread in self.threads:
            thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(handler: Handler, tls: ssl.SSLContext | None = None) -> Scripted:
        servers.append(Scripted(handler, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def read_request(conn: socket.socket) -> bytes:
    """The request head (and nothing after it) as the client sent it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def answer(body: bytes, extra: str = "", ctype: str = "application/json") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


def keep_answering(conn: socket.socket) -> None:
    while read_request(conn):
        conn.sendall(answer(JSON_BODY))


# ---- TLS ----------------------------------------------------------------------------


def make_cert(root: Path, name: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found: install the Debian package openssl")
    root.mkdir(parents=True, exist_ok=True)
    cert, key = root / f"{name}.crt", root / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def cert_fingerprint(cert: Path) -> str:
    return tls_pinning.fingerprint(ssl.PEM_cert_to_DER_cert(cert.read_text()))


@pytest.fixture
def known_certs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cfg" / "known_certs"
    monkeypatch.setenv("SPK_VISOR_KNOWN_CERTS", str(path))
    return path


def get(transport: HttpTransport, path: str = "/api/health") -> tuple[int, bytes]:
    resp = transport.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
    return resp.status, resp.body


def failure(url: str, timeout: float = 10) -> tuple[TransportError, float]:
    """The error of one GET to `url` on a fresh transport, and the seconds it took."""
    transport = HttpTransport(url, timeout=timeout)
    started = time.monotonic()
    try:
        get(transport)
    except TransportError as e:
        return e, time.monotonic() - started
    finally:
        transport.close()
    raise AssertionError(f"GET {url} succeeded")


def test_a_pinned_certificate_is_served(serve: Callable[..., Scripted], tmp_path: Path,
                                        known_certs: Path) -> None:  # fmt: skip
    cert, key = make_cert(tmp_path, "node")
    server = serve(keep_answering, server_context(cert, key))
    tls_pinning.record(known_certs, f"127.0.0.1:{server.port}", cert_fingerprint(cert))
    transport = HttpTransport(server.url, timeout=10)
    try:
        assert get(transport) == (200, JSON_BODY)
        assert get(transport) == (200, JSON_BODY)
    finally:
        transport.close()
    assert server.connections == 1  # kept alive


def test_a_pin_mismatch_sends_no_byte_of_the_request(
    serve: Callable[..., Scripted], tmp_path: Path, known_certs: Path
) -> None:
    cert, key = make_cert(tmp_path, "node")
    impostor, _ = make_cert(tmp_path / "other", "impostor")
    received: list[bytes] = []

    def record_everything(conn: socket.socket) -> None:
        conn.settimeout(3)
        with contextlib.suppress(OSError):
            while chunk := conn.recv(4096):
                received.append(chunk)

    server = serve(record_everything, server_context(cert, key))
    tls_pinning.record(known_certs, f"127.0.0.1:{server.port}", cert_fingerprint(impostor))
    error, _ = failure(server.url)
    assert isinstance(error, CertificateError)
    assert error.exit_code == ExitCode.REFUSED
    assert "CHANGED" in error.message
    assert cert_fingerprint(cert) in error.message
    assert cert_fingerprint(impostor) in error.message
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in server.threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"".join(received) == b"", "the request (and its token) reached the wrong node"


def test_a_tls_peer_that_drips_its_handshake_is_cut_off_at_the_deadline(
    serve: Callable[..., Scripted], tmp_path: Path, known_certs: Path
) -> None:
    """A relay in front of a real TLS server, passing the server's bytes on one every
    50 ms: the handshake alone would take a minute. The deadline is the whole request's."""
    cert, key = make_cert(tmp_path, "node")
    backend = serve(keep_answering, server_context(cert, key))
    tls_pinning.record(known_certs, f"127.0.0.1:{backend.port}", cert_fingerprint(cert))

    def drip(conn: socket.socket) -> None:
        with socket.create_connection(("127.0.0.1", backend.port), timeout=10) as up:
            up.settimeout(0.05)
            conn.settimeout(0.05)
            pending = b""
            end = time.monotonic() + 20
            while time.monotonic() < end:
                with contextlib.suppress(TimeoutError):
                    data = conn.recv(4096)
                    if not data:
                        return
                    up.sendall(data)
                with contextlib.suppress(TimeoutError):
                    pending += up.recv(4096)
                if pending:
                    conn.sendall(pending[:1])
                    pending = pending[1:]

    relay = serve(drip)
    # The relay's address, held to the backend's pinned certificate.
    tls_pinning.record(known_certs, f"127.0.0.1:{relay.port}", cert_fingerprint(cert))
    error, elapsed = failure(f"https://127.0.0.1:{relay.port}", timeout=1)
    assert error.exit_code == ExitCode.TRANSIENT
    assert "within 1 s" in error.message
    assert elapsed < 4, f"a 1 s deadline took {elapsed:.1f} s"


def test_plain_http_on_the_https_port_is_a_tls_failure(
    serve: Callable[..., Scripted], known_certs: Path
) -> None:
    def plain(conn: socket.socket) -> None:
        conn.recv(4096)  # a ClientHello, which a plain HTTP server answers with a 400
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    server = serve(plain)
    tls_pinning.record(known_certs, f"127.0.0.1:{server.port}", "AA:BB")
    error, _ = failure(f"https://127.0.0.1:{server.port}", timeout=5)
    assert error.exit_code == ExitCode.TRANSIENT
    assert error.message.startswith(f"TLS failed with https://127.0.0.1:{server.port}: ")


# ---- bodies -------------------------------------------------------------------------


def test_a_chunked_answer_is_put_together(serve: Callable[..., Scripted]) -> None:
    def chunked(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(0, len(JSON_BODY), 7):
            part = JSON_BODY[i : i + 7]
            conn.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        conn.sendall(b"0\r\n\r\n")
        keep_answering(conn)

    server = serve(chunked)
    transport = HttpTransport(server.url, timeout=10)
    try:
        assert get(transport) == (200, JSON_BODY)
        assert get(transport) == (200, JSON_BODY)  # the framing ended where it should
    finally:
        transport.close()
    assert server.connections == 1


def test_an_endless_chunked_answer_stops_at_the_cap(serve: Callable[..., Scripted]) -> None:
    sent = [0]

    def endless(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b" " * 65536
        while sent[0] < 4 * MAX_RESPONSE_BYTES:
            conn.sendall(b"10000\r\n" + chunk + b"\r\n")
            sent[0] += len(chunk)

    server = serve(endless)
    error, _ = failure(server.url, timeout=30)
    assert error.message == (
        f"{server.url}: answer larger than {MAX_RESPONSE_BYTES} bytes; not smechvisord?"
    )
    assert sent[0] < 2 * MAX_RESPONSE_BYTES


def test_a_declared_oversize_body_is_refused_without_waiting_for_it(
    serve: Callable[..., Scripted],
) -> None:
    def huge(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1099511627776\r\n\r\n{"
        )
        time.sleep(8)

    server = serve(huge)
    error, elapsed = failure(server.url, timeout=6)
    assert error.message == (
        f"{server.url}: answer larger than {MAX_RESPONSE_BYTES} bytes; not smechvisord?"
    )
    assert elapsed < 4


def test_a_body_shorter_than_its_content_length_is_an_error(
    serve: Callable[..., Scripted],
) -> None:
    def short(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(answer(JSON_BODY).replace(b"Length: 35", b"Length: 90"))
        conn.shutdown(socket.SHUT_WR)

    server = serve(short)
    error, _ = failure(server.url, timeout=10)
    assert error.exit_code == ExitCode.TRANSIENT
    assert error.message.startswith(f"{server.url}: connection lost mid-answer")


def test_bytes_beyond_the_content_length_are_never_read_as_the_next_answer(
    serve: Callable[..., Scripted],
) -> None:
    """A peer that sends more than it declared, on a kept-alive connection: the extra
    bytes look like a second answer. The next request must not take them for its own."""
    smuggled = answer(b'{"status": "smuggled"}')

    def overlong(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(answer(JSON_BODY) + smuggled)
        keep_answering(conn)

    server = serve(overlong)
    transport = HttpTransport(server.url, timeout=10)
    try:
        assert get(transport) == (200, JSON_BODY)
        time.sleep(0.2)  # the extra bytes have arrived
        assert get(transport) == (200, JSON_BODY)
    finally:
        transport.close()


def test_a_slow_loris_answer_is_cut_off_at_the_deadline(serve: Callable[..., Scripted]) -> None:
    def loris(conn: socket.socket) -> None:
        read_request(conn)
        for byte in answer(JSON_BODY * 10):
            conn.sendall(bytes([byte]))
            time.sleep(0.1)

    server = serve(loris)
    error, elapsed = failure(server.url, timeout=1)
    assert error.message == f"no answer from {server.url} within 1 s"
    assert elapsed < 4, f"a 1 s deadline took {elapsed:.1f} s"


def test_a_peer_that_closes_without_answering(serve: Callable[..., Scripted]) -> None:
    server = serve(read_request)
    error, _ = failure(server.url, timeout=10)
    assert error.exit_code == ExitCode.TRANSIENT
    assert error.message.startswith(f"cannot reach {server.url}")


def test_a_connection_close_answer_is_read_to_its_end(serve: Callable[..., Scripted]) -> None:
    """`Connection: close`: http.client closes its side of the connection as soon as the
    head is read and hands the socket to the answer; the body, sent later, is still
    read, and the next request opens a new connection."""

    def close_after(conn: socket.socket) -> None:
        read_request(conn)
        head, _, body = answer(JSON_BODY, extra="Connection: close\r\n").partition(b"\r\n\r\n")
        conn.sendall(head + b"\r\n\r\n")
        time.sleep(0.3)
        conn.sendall(body)

    server = serve(close_after)
    transport = HttpTransport(server.url, timeout=10)
    try:
        assert get(transport) == (200, JSON_BODY)
        assert get(transport) == (200, JSON_BODY)
    finally:
        transport.close()
    assert server.connections == 2


def test_a_kept_alive_connection_the_peer_closed_is_replaced(
    serve: Callable[..., Scripted],
) -> None:
    def one_then_close(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(answer(JSON_BODY))  # keep-alive by HTTP/1.1's default, then gone

    server = serve(one_then_close)
    transport = HttpTransport(server.url, timeout=10)
    try:
        assert get(transport) == (200, JSON_BODY)
        time.sleep(0.2)
        assert get(transport) == (200, JSON_BODY)
    finally:
        transport.close()
    assert server.connections == 2


# ---- through the CLI: what the operator sees ------------------------------------------


def test_not_json_is_a_protocol_error(serve: Callable[..., Scripted]) -> None:
    def broken(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(answer(b'{"cpu_model": '))

    server = serve(broken)
    r = cli.run("--node", server.url, "--token", TOKEN, "node")
    assert r.code == ExitCode.USAGE, r
    assert r.err_lines[0].startswith(f"spk-visor: error: {server.url}/api/node: invalid JSON: ")


def test_a_redirect_is_not_followed(serve: Callable[..., Scripted]) -> None:
    """The token must not follow a redirect to another address."""
    elsewhere = serve(keep_answering)

    def redirect(conn: socket.socket) -> None:
        read_request(conn)
        body = b'{"error": {"code": "moved", "message": "elsewhere"}}'
        conn.sendall(
            f"HTTP/1.1 302 Found\r\nLocation: {elsewhere.url}/api/node\r\n"
            f"Content-Type: text/html\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    server = serve(redirect)
    r = cli.run("--node", server.url, "--token", TOKEN, "node")
    assert r.code == ExitCode.USAGE, r
    assert r.err_lines[0] == (
        f"spk-visor: error: {server.url}/api/node answered HTTP 302 with text/html, "
        "not smechvisord's JSON"
    )
    assert elsewhere.connections == 0


def test_the_token_and_a_user_agent_are_sent(serve: Callable[..., Scripted]) -> None:
    heads: list[bytes] = []

    def record(conn: socket.socket) -> None:
        heads.append(read_request(conn))
        conn.sendall(answer(b'{"cpu_model": "x", "hostname": "h"}'))

    server = serve(record)
    r = cli.run("--node", server.url, "--token", TOKEN, "--json", "node")
    assert r.code == 0, r
    lines = heads[0].decode().split("\r\n")
    assert lines[0] == "GET /api/node HTTP/1.1"
    assert f"Authorization: Bearer {TOKEN}" in lines
    assert f"Host: 127.0.0.1:{server.port}" in lines
    assert any(line.startswith("User-Agent: spk-visor/") for line in lines)


def test_a_proxy_in_the_environment_is_not_used(
    serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes are on the LAN; a token must not go to a proxy (as before: requests was told
    to ignore the environment)."""
    proxy = serve(keep_answering)
    server = serve(keep_answering)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    transport = HttpTransport(server.url, timeout=10)
    try:
        assert get(transport) == (200, JSON_BODY)
    finally:
        transport.close()
    assert proxy.connections == 0


def test_an_oversize_header_is_a_transport_error(serve: Callable[..., Scripted]) -> None:
    def long_header(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(answer(JSON_BODY, extra="X-Junk: " + "j" * 100_000 + "\r\n"))

    server = serve(long_header)
    error, _ = failure(server.url)
    assert error.exit_code == ExitCode.TRANSIENT
    assert error.message.startswith(f"cannot reach {server.url}: not an HTTP answer")


def test_a_ca_file_that_is_not_pem_is_a_usage_error(tmp_path: Path) -> None:
    """Named before any connection, exit 2 (the requests client loaded it only once
    connected, and so first reported whatever the connection did: here, refused, exit 7)."""
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    r = cli.run("--node", "https://127.0.0.1:1", "--token", TOKEN, "--ca-file", str(bogus), "node")
    assert r.code == ExitCode.USAGE, r
    assert r.err_lines[0].startswith(
        f"spk-visor: error: --ca-file {bogus}: not a PEM file of CA certificates"
    )


def test_a_ca_file_that_is_a_folder_is_named_as_one(tmp_path: Path) -> None:
    """A folder given as --ca-file exists: saying "no such file" sends the admin to look
    for a typo that is not there."""
    r = cli.run(
        "--node", "https://127.0.0.1:1", "--token", TOKEN, "--ca-file", str(tmp_path), "node"
    )
    assert r.code == ExitCode.USAGE, r
    assert r.err_lines[0] == f"spk-visor: error: --ca-file {tmp_path}: is a folder, not a file"
    missing = tmp_path / "missing.pem"
    r = cli.run(
        "--node", "https://127.0.0.1:1", "--token", TOKEN, "--ca-file", str(missing), "node"
    )
    assert r.code == ExitCode.USAGE, r
    assert r.err_lines[0] == f"spk-visor: error: --ca-file {missing}: no such file"
