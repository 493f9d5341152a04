"""`--node` pointed at another JSON service (a wrong port, another product's API) gets a
usage error that says so, from every command: it was `internal error: AttributeError`
(exit 1) wherever the answer was JSON of another shape."""

from __future__ import annotations

import http.server
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
