"""A client that sends part of a request and stops: once the request timeout (or the
per-read socket timeout) runs out, the daemon answers 408 Request Timeout with
Connection: close, as nginx does, instead of closing without a word. A connection that
sent nothing, or went quiet between requests, is closed without an answer."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.support.daemon import Daemon, DaemonEnv
from tests.support.hostile import (
    ATTACKER,
    baseline,
    connect_from,
    exchange,
    prove,
    read_until_closed,
    status_of,
)

REQUEST_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    env = DaemonEnv(tmp_path_factory.mktemp("stalled"))
    env.extra_env["SMECHVISORD_REQUEST_TIMEOUT"] = str(REQUEST_TIMEOUT)
    d = Daemon(env)
    yield d
    d.stop()
    env.cleanup()


def stalled(token: str) -> dict[str, bytes]:
    body_head = (
        f"POST /api/vfio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    return {
        "half a request line": b"GET /api/hea",
        "a request line without its end": b"GET /api/health HTTP/1.1",
        "half the headers": b"GET /api/node HTTP/1.1\r\nHost: x\r\n",
        "a header line cut short": b"GET /api/node HTTP/1.1\r\nHost: x\r\nX-Cut: ab",
        "half the body": body_head + b'{"enable": ',
    }


def open_connection(stack: contextlib.ExitStack, rig: Daemon, tls: bool) -> socket.socket:
    """A connection from the attacker's address, over TLS if asked (no certificate check:
    the tests are of the server, not its certificate)."""
    s: socket.socket = stack.enter_context(
        contextlib.closing(connect_from(ATTACKER, rig.port, timeout=REQUEST_TIMEOUT + 8))
    )
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s = stack.enter_context(ctx.wrap_socket(s))
    return s


def trickle(s: socket.socket, byte: bytes, gap: float, deadline: float) -> bytes:
    """Send `byte` every `gap` s until the daemon answers or `deadline` passes, then
    read to the close. Between bytes it reads: a byte sent after the daemon closed would
    reset the connection and could lose the answer."""
    answer = b""
    with contextlib.suppress(OSError):  # the daemon ends it: a write or read fails
        while time.monotonic() < deadline and not answer:
            s.sendall(byte)
            s.settimeout(gap)
            with contextlib.suppress(TimeoutError):
                answer += s.recv(65536)
        s.settimeout(5)
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def assert_408(answer: bytes) -> None:
    assert status_of(answer) == 408, answer[:300]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head
    assert json.loads(body)["error"]["code"] == "request_timeout"


@pytest.mark.parametrize(
    "case",
    [
        "half a request line",
        "a request line without its end",
        "half the headers",
        "a header line cut short",
        "half the body",
    ],
)
def test_a_stalled_request_is_answered_408(rig: Daemon, case: str) -> None:
    before = baseline(rig)
    started = time.monotonic()
    answer = exchange(rig, stalled(rig.token)[case], source=ATTACKER, wait=REQUEST_TIMEOUT + 8)
    elapsed = time.monotonic() - started
    assert_408(answer)
    # The timeout is the one configured: not cut earlier.
    assert elapsed >= REQUEST_TIMEOUT - 0.2
    assert rig.env.recorded() == []  # the stalled VFIO request never ran
    prove(rig, before)


def test_a_silent_connection_is_closed_without_an_answer(rig: Daemon) -> None:
    before = baseline(rig)
    assert exchange(rig, b"", source=ATTACKER, wait=REQUEST_TIMEOUT + 8) == b""
    prove(rig, before)


def test_an_idle_kept_alive_connection_is_closed_without_an_answer(rig: Daemon) -> None:
    with contextlib.closing(connect_from(ATTACKER, rig.port)) as s:
        s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_until_closed(s, REQUEST_TIMEOUT + 8)
    # One answer (the health document), then the close: no 408 for a request never begun.
    assert answer.count(b"HTTP/1.1 ") == 1 and status_of(answer) == 200


@pytest.mark.parametrize("case", ["half the headers", "half the body"])
def test_a_read_that_outlasts_the_socket_timeout_is_answered_408(
    daemon_env: DaemonEnv, case: str
) -> None:
    """The per-read socket timeout, when it is the shorter of the two, ends the request
    the same way (a body read that timed out was an internal error, 500)."""
    daemon_env.extra_env["SMECHVISORD_SOCKET_TIMEOUT"] = "1"
    daemon_env.extra_env["SMECHVISORD_REQUEST_TIMEOUT"] = "30"
    d = Daemon(daemon_env)
    try:
        before = baseline(d)
        started = time.monotonic()
        answer = exchange(d, stalled(d.token)[case], source=ATTACKER, wait=20)
        assert_408(answer)
        assert time.monotonic() - started < 20
        prove(d, before)
    finally:
        d.stop()


@pytest.mark.parametrize("case", ["half a request line", "half the headers", "half the body"])
def test_a_stalled_request_over_tls_is_answered_408(rig: Daemon, case: str) -> None:
    """Over TLS too: the deadline must not end the connection under the TLS layer (a
    shutdown of the read side reads as end-of-stream to OpenSSL, and the 408 was lost)."""
    before = baseline(rig)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test is of the server, not its certificate
    started = time.monotonic()
    with (
        contextlib.closing(connect_from(ATTACKER, rig.port, timeout=REQUEST_TIMEOUT + 8)) as raw,
        ctx.wrap_socket(raw) as s,
    ):
        s.sendall(stalled(rig.token)[case])
        answer = b""
        with contextlib.suppress(OSError):  # an unclean close ends the answer too
            while chunk := s.recv(65536):
                answer += chunk
    assert_408(answer)
    assert time.monotonic() - started >= REQUEST_TIMEOUT - 0.2
    assert rig.env.recorded() == []
    prove(rig, before)


@pytest.mark.parametrize("gap", [0.3, 0.005], ids=["slow", "fast"])
def test_a_trickled_header_line_over_tls_is_answered_408(rig: Daemon, gap: float) -> None:
    """A byte every `gap` s, each read returning in time: the deadline still ends the
    request with a 408 (not the watchdog's cut, which over TLS leaves no answer)."""
    before = baseline(rig)
    with contextlib.ExitStack() as stack:
        s = open_connection(stack, rig, tls=True)
        s.sendall(b"GET /api/node HTTP/1.1\r\nX-Slow: ")
        answer = trickle(s, b"a", gap, time.monotonic() + REQUEST_TIMEOUT + 6)
    assert_408(answer)
    prove(rig, before)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("gap", [0.3, 0.005], ids=["slow", "fast"])
def test_a_trickled_body_is_answered_408(rig: Daemon, gap: float, tls: bool) -> None:
    """The body, a byte every `gap` s, each read returning in time: the request deadline
    still ends it with a 408, plain and over TLS, and the half-sent body never runs."""
    before = baseline(rig)
    # Far more body than can come at a byte per `gap` s within the deadline (a fast
    # trickle sends some hundreds); JSON allows the spaces.
    length = 60000
    head = (
        f"POST /api/vfio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {rig.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        '{"enable": true'
    ).encode()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        s = open_connection(stack, rig, tls)
        s.sendall(head)
        answer = trickle(s, b" ", gap, started + REQUEST_TIMEOUT + 6)
    assert_408(answer)
    assert time.monotonic() - started >= REQUEST_TIMEOUT - 0.2
    assert rig.env.recorded() == []
    prove(rig, before)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_empty_lines_before_a_trickled_head_do_not_lift_the_deadline(
    rig: Daemon, tls: bool
) -> None:
    """Empty lines before the request line, then a header line a byte every 0.3 s. A
    buffer that began with CRLF CRLF passed for a whole head, and the rest of it was read
    without the deadline: the watchdog's cut, a second late, ended it (a late 408 plain,
    none over TLS)."""
    before = baseline(rig)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        s = open_connection(stack, rig, tls)
        # From here, not from before the connect: a TLS handshake on a loaded machine
        # must not eat into the margin below.
        connected = time.monotonic()
        s.sendall(b"\r\n\r\nGET /api/node HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answer = trickle(s, b"a", 0.3, connected + REQUEST_TIMEOUT + 6)
    ended = time.monotonic()
    assert_408(answer)
    # The deadline's own 408, not the watchdog's cut BACKSTOP_GRACE (1 s) later (over
    # TLS that cut sends no 408 at all, so assert_408 alone tells them apart there).
    assert ended - started >= REQUEST_TIMEOUT - 0.2, ended - started
    assert ended - connected < REQUEST_TIMEOUT + 0.9, ended - connected
    prove(rig, before)


def test_an_idle_connection_after_a_trailing_crlf_gets_no_answer(rig: Daemon) -> None:
    """Some clients send a CRLF after a request (after a POST body): an empty line, not
    the start of a request. The connection then idles and must be closed without a word;
    it got a 408."""
    before = baseline(rig)
    with contextlib.closing(connect_from(ATTACKER, rig.port)) as s:
        s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n\r\n")
        answer = read_until_closed(s, REQUEST_TIMEOUT + 8)
    assert answer.count(b"HTTP/1.1 ") == 1 and status_of(answer) == 200, answer
    prove(rig, before)
