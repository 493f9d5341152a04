"""Client of one cloud-hypervisor's REST API on its Unix socket (http://localhost/api/v1/...)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from smechvisord.protocol import MAX_CONSOLE_BYTES

API_BASE = "/api/v1/"
# v42's micro_http never sends much; cap what we read from it anyway.
MAX_REPLY_BYTES = MAX_CONSOLE_BYTES


class ChApiError(Exception):
    """The VMM answered with an error. v42 answers 500 with a plain-text reason for every
    VM-side failure ("VM is not running"), so `reason` is that text."""

    def __init__(self, endpoint: str, status: int, reason: str) -> None:
        super().__init__(f"{endpoint}: HTTP {status}: {reason}")
        self.endpoint = endpoint
        self.status = status
        self.reason = reason


class ChUnreachableError(Exception):
    """The socket is missing or nobody answers on it (the VMM exited or is starting)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ChApi:
    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _call(self, method: str, endpoint: str) -> tuple[int, bytes]:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            # A bodyless PUT must carry no body: http.client sends Content-Length: 0,
            # which v42 treats as "no body".
            conn.request(method, API_BASE + endpoint)
            resp = conn.getresponse()
            body = resp.read(MAX_REPLY_BYTES)
            return resp.status, body
        except (OSError, http.client.HTTPException) as e:
            raise ChUnreachableError(f"{endpoint}: {e}") from e
        finally:
            conn.close()

    def _check(self, endpoint: str, status: int, body: bytes) -> bytes:
        if status >= 300:
            raise ChApiError(endpoint, status, body.decode("utf-8", "replace").strip())
        return body

    def get(self, endpoint: str) -> dict[str, Any]:
        status, body = self._call("GET", endpoint)
        data = self._check(endpoint, status, body)
        try:
            parsed = json.loads(data)
        except ValueError as e:
            raise ChApiError(endpoint, status, f"not JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise ChApiError(endpoint, status, "not a JSON object")
        return parsed

    def put(self, endpoint: str) -> None:
        # v42 answers 204, except vmm.shutdown which answers 200 (the spec says 204).
        status, body = self._call("PUT", endpoint)
        self._check(endpoint, status, body)

    def ping(self) -> dict[str, Any]:
        return self.get("vmm.ping")

    def info(self) -> dict[str, Any]:
        return self.get("vm.info")
