"""One connection, one answer for a refused request head: when the request deadline
comes while the refusal (400, 431, 505...) is being written, no 408 follows it.

In process, so the refusal can be made to outlast the deadline on purpose (on a loaded
machine it does so by chance)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smechvisord import conns
from smechvisord.server import DaemonServer, RequestHandler, Router

HEAD_TIMEOUT = 0.5


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonServer]:
    original = RequestHandler.send_error

    def slow_refusal(self: RequestHandler, code: int, *args: Any, **kwargs: Any) -> None:
        original(self, code, *args, **kwargs)
        if code != 408:
            # The deadline and the watchdog's backstop both pass before the worker goes on.
            time.sleep(HEAD_TIMEOUT + conns.BACKSTOP_GRACE + 1.0)

    monkeypatch.setattr(RequestHandler, "send_error", slow_refusal)
    srv = DaemonServer(
        ("127.0.0.1", 0),
        Router(),
        "t" * 32,
        tmp_path,
        max_connections=8,
        socket_timeout=10.0,
        head_timeout=HEAD_TIMEOUT,
    )
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /api/node\r\n\r\n",  # 400: two words
        b"GET /api/node HTTP/2.0\r\nHost: x\r\n\r\n",  # 505
        b"GET /api/node HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",  # 400
    ],
)
def test_a_refusal_is_the_only_answer(server: DaemonServer, head: bytes) -> None:
    port = int(server.server_address[1])
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(head)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 "), answer
    assert answer.split()[1] != b"408", answer
    assert len(re.findall(rb"(?m)^HTTP/1\.1 \d{3} ", answer)) == 1, answer
