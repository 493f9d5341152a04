"""`--node` pointed at another JSON service (a wrong port, another product's API) gets a
usage error that says so, from every command: it was `internal error: AttributeError`
(exit 1) wherever the answer was JSON of another shape."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support.cli import run

COMMANDS = [
    ["node"], ["vm", "list"], ["vm", "show", "a"], ["iommu"], ["pci"], ["vfio", "status"],
    ["vfio", "enable"], ["reboot-uefi", "--yes"], ["vm", "start", "a"], ["vm", "stop", "a"],
    ["vm", "console", "a"], ["vm", "delete", "--yes", "a"],
    ["vm", "create", "-c", "1", "-m", "512", "-d", "/a"],
    ["vm", "create", "-c", "1", "-m", "512", "-d", "/a", "--dry-run"],
]  # fmt: skip
BODIES = [b'{"status": "ok", "items": "x"}', b'[1, "x", null]', b'"ok"']


@pytest.fixture(params=BODIES, ids=["object", "list", "string"])
def other_service(request: pytest.FixtureRequest) -> Iterator[str]:
    body: bytes = request.param

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_DELETE = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_json_of_another_shape_is_a_usage_error(other_service: str) -> None:
    for argv in COMMANDS:
        r = run("--node", other_service, "--token", "abcdefghijklmnopqrstuvwx", *argv)
        assert r.code == 2, (argv, r)
        assert "not smechvisord's" in r.err_lines[0], (argv, r.err)
        assert r.err_lines[-1] == "check the URL and port: is this a SmechVisor node?", r.err


@pytest.fixture
def ssh_like_service() -> Iterator[str]:
    """A listener that answers every connection with an SSH banner, as sshd on port 22 does."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
                conn.settimeout(1.0)
                try:
                    conn.recv(4096)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        srv.close()


def test_a_port_that_speaks_another_protocol_is_a_usage_error(ssh_like_service: str) -> None:
    # It answered, so the node is up: "is the service running?" (exit 7, retry later) sends
    # the operator the wrong way; the URL's port is what is wrong.
    r = run("--node", ssh_like_service, "--token", "abcdefghijklmnopqrstuvwx", "node")
    assert r.code == 2, r
    assert "not HTTP" in r.err_lines[0] and "SSH-2.0" in r.err_lines[0], r.err
    assert r.err_lines[-1] == "check the URL and port: is this a SmechVisor node?", r.err
