"""HTTP over a Unix socket, for talking to cloud-hypervisor (or its stand-in) in tests."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client on an AF_UNIX stream socket; the Host header says "localhost"."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def read_reply(conn: http.client.HTTPConnection) -> Reply:
    resp = conn.getresponse()
    body = resp.read()
    return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def call(
    path: str,
    method: str,
    endpoint: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Reply:
    """One request on a fresh connection. `endpoint` is e.g. "vm.info" or a full path."""
    url = endpoint if endpoint.startswith("/") else f"/api/v1/{endpoint}"
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        return read_reply(conn)
    finally:
        conn.close()
