"""RFC 9112 message syntax, as an attacker probes it: the Host header HTTP/1.1 requires,
request lines with characters a URL parser drops (a tab, a CR) or never allows (NUL,
non-ASCII, `#`), bare LF line ends, `Expect: 100-continue` before the token is checked,
the connection after a 400, and the shapes already refused that no other test sends.

Each refusal is a single answer and a closed connection: a request pipelined behind it is
never read (a proxy in front that framed the first one differently would have sent it)."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from tests.support.daemon import Daemon, DaemonEnv, kill_vmms
from tests.support.hostile import (
    ATTACKER,
    baseline,
    connect_from,
    exchange,
    prove,
    read_until_closed,
    status_of,
)

# Short: a connection the daemon wrongly keeps open ends the exchange in 2 s, not 10.
REQUEST_TIMEOUT = 2.0
SMUGGLED = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, DaemonEnv]]:
    env = DaemonEnv(tmp_path_factory.mktemp("http11"))
    env.extra_env["SMECHVISORD_REQUEST_TIMEOUT"] = str(REQUEST_TIMEOUT)
    d = Daemon(env)
    yield d, env
    d.stop()
    kill_vmms(env.run_dir)
    env.cleanup()


def get(d: Daemon, target: str = "/api/node", version: str = "HTTP/1.1", extra: str = "") -> bytes:
    return (
        f"GET {target} {version}\r\nHost: x\r\nAuthorization: Bearer {d.token}\r\n{extra}\r\n"
    ).encode("utf-8", "surrogateescape")


def post(d: Daemon, body: bytes, extra: str = "", path: str = "/api/vfio") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {d.token}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode() + body


def assert_refused(answer: bytes, status: int) -> dict[str, object]:
    """One JSON error answer, the connection closed after it, nothing pipelined answered."""
    assert status_of(answer) == status, answer[:400]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head, head
    doc = json.loads(body)
    assert isinstance(doc["error"], dict)
    return doc["error"]


# ---- Host ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/health HTTP/1.1\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: x/y\r\n\r\n",
        b"GET /api/health HTTP/1.0\r\nHost: a@b c\r\n\r\n",
    ],
    ids=["no Host", "Host with a space", "Host with a slash", "HTTP/1.0 with a bad Host"],
)
def test_http11_without_one_valid_host_is_400(rig: tuple[Daemon, DaemonEnv], raw: bytes) -> None:
    """RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host,
    or with an invalid one. They were served."""
    d, _ = rig
    before = baseline(d)
    err = assert_refused(exchange(d, raw + SMUGGLED), 400)
    assert "Host" in str(err["message"])
    prove(d, before)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/health HTTP/1.0\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",  # no authority
        b"GET /api/health HTTP/1.1\r\nhOsT: [::1]:8080\r\nConnection: close\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: node-1.example:8080\r\nConnection: close\r\n\r\n",
    ],
    ids=["HTTP/1.0 without Host", "empty Host", "IPv6 literal", "name and port"],
)
def test_requests_with_a_host_or_from_http10_are_served(
    rig: tuple[Daemon, DaemonEnv], raw: bytes
) -> None:
    d, _ = rig
    answer = exchange(d, raw)
    assert status_of(answer) == 200, answer[:300]


# ---- request line ----------------------------------------------------------------------


REQUEST_LINES = {
    # urllib.parse.urlsplit drops tabs, CR and LF: "/api/no\tde" was served as /api/node.
    "tab in the target": "GET /api/no\tde HTTP/1.1",
    "bare CR in the target": "GET /api/node\r HTTP/1.1",
    "NUL in the target": "GET /api/no\0de HTTP/1.1",
    "DEL in the target": "GET /api/node\x7f HTTP/1.1",
    "escape in the target": "GET /api/\x1b[2Jnode HTTP/1.1",
    "UTF-8 in the target": "GET /api/n\udcc3\udcb6de HTTP/1.1",
    "latin-1 no-break space in the target": "GET /api/node\udca0 HTTP/1.1",
    # A fragment is never sent; urlsplit drops it, a proxy's ACL may not.
    "fragment": "GET /api/health#/../node HTTP/1.1",
    "NUL in the method": "G\0ET /api/node HTTP/1.1",
    "UTF-8 in the method": "G\udcc3\udc89T /api/node HTTP/1.1",
    "method with a colon": "GE:T /api/node HTTP/1.1",
    "asterisk on a GET": "GET * HTTP/1.1",
    "relative target": "GET api/node HTTP/1.1",
    "another scheme": "GET x:/api/node HTTP/1.1",
}


@pytest.mark.parametrize("case", list(REQUEST_LINES))
def test_a_request_line_with_what_a_uri_cannot_hold_is_400(
    rig: tuple[Daemon, DaemonEnv], case: str
) -> None:
    """RFC 9112 section 3: method = token, request-target a URI (visible ASCII, no `#`);
    invalid is 400. These were served (tab, CR), 404, or 501 and kept alive."""
    d, _ = rig
    before = baseline(d)
    line = REQUEST_LINES[case]
    raw = f"{line}\r\nHost: x\r\nAuthorization: Bearer {d.token}\r\n\r\n"
    answer = exchange(d, raw.encode("utf-8", "surrogateescape") + SMUGGLED)
    assert_refused(answer, 400)
    assert b"cpu_model" not in answer  # /api/node's document
    assert not [logged for logged in d.lines if "\x1b" in logged or "\0" in logged]
    prove(d, before)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/node HTTP/1.1\nHost: x\nAuthorization: Bearer {token}\n\n",
        b"GET /api/node HTTP/1.1\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n",
        b"GET /api/node HTTP/1.1\r\nHost: x\nAuthorization: Bearer {token}\r\n\r\n",
        b"GET /api/node HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\n",
    ],
    ids=["every line", "the request line", "one header line", "the blank line"],
)
def test_a_line_ended_by_a_bare_lf_is_400(rig: tuple[Daemon, DaemonEnv], raw: bytes) -> None:
    """CRLF ends a line (RFC 9112 section 2.2). A proxy that reads "Host: x\\nX: y" as one
    field and the daemon as two disagree on the headers (Node.js's CVE-2023-30589). They
    were served."""
    d, _ = rig
    before = baseline(d)
    answer = exchange(d, raw.replace(b"{token}", d.token.encode()) + SMUGGLED)
    err = assert_refused(answer, 400)
    assert "CRLF" in str(err["message"])
    prove(d, before)


def test_an_empty_line_before_a_request_is_ignored(rig: tuple[Daemon, DaemonEnv]) -> None:
    """RFC 9112 section 2.2: a server SHOULD ignore an empty line before the request line
    (some clients send a CRLF after a POST body). The connection was closed unanswered."""
    d, _ = rig
    answer = exchange(d, b"\r\n" + SMUGGLED + b"\r\n" + SMUGGLED, wait=REQUEST_TIMEOUT + 3)
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer


# ---- Expect: 100-continue ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "extra", "status"),
    [
        ("", "Content-Length: 16\r\n", 401),
        ("Authorization: Bearer wrong\r\n", "Content-Length: 16\r\n", 403),
        ("{auth}", "Content-Length: 16\r\nContent-Length: 16\r\n", 400),
        ("{auth}", "Content-Length: 1000000\r\n", 413),
        ("{auth}", "Content-Length: 16\r\nTransfer-Encoding: chunked\r\n", 501),
    ],
    ids=["no token", "wrong token", "two lengths", "too large", "chunked"],
)
def test_expect_100_continue_is_not_granted_to_a_request_refused_unread(
    rig: tuple[Daemon, DaemonEnv], auth: str, extra: str, status: int
) -> None:
    """`100 Continue` asks the client for its body. It was sent at once, before the token
    or the framing was looked at: anyone could make the daemon ask for a body."""
    d, env = rig
    before = baseline(d)
    head = (
        f"POST /api/vfio HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
        f"Expect: 100-continue\r\n{extra}\r\n"
    ).replace("{auth}", f"Authorization: Bearer {d.token}\r\n")
    with contextlib.closing(connect_from(ATTACKER, d.port)) as s:
        s.sendall(head.encode())
        answer = read_until_closed(s, REQUEST_TIMEOUT + 3)
    assert b" 100 " not in answer.split(b"\r\n", 1)[0], answer[:200]
    assert_refused(answer, status)
    assert env.recorded() == []
    prove(d, before)


def test_expect_100_continue_is_granted_once_the_body_is_wanted(
    rig: tuple[Daemon, DaemonEnv],
) -> None:
    d, _ = rig
    body = b"{}"
    with contextlib.closing(connect_from(ATTACKER, d.port)) as s:
        s.sendall(
            post(d, b"", f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n",
                 path="/api/vms/nope/stop")
        )  # fmt: skip
        first = b""
        while b"\r\n\r\n" not in first:
            chunk = s.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), first
        s.sendall(body)
        answer = first.split(b"\r\n\r\n", 1)[1]
        while b'"details"' not in answer:
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
    assert status_of(answer) == 404, answer  # the route ran: the VM is not there
    assert b"no VM named" in answer


# ---- after an error --------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["length too short", "length too long", "not JSON", "405"],
)
def test_the_connection_closes_after_a_400(rig: tuple[Daemon, DaemonEnv], case: str) -> None:
    """A body that does not parse is the sign of a Content-Length that is wrong: what
    follows it must not be read as the next request. It was (two answers). A 405 does not
    close."""
    d, env = rig
    before = baseline(d)
    body = b'{"enable": true}'
    raw = {
        "length too short": post(d, body + SMUGGLED, "Content-Length: 5\r\n"),
        "length too long": post(d, body + SMUGGLED, f"Content-Length: {len(body) + 9}\r\n"),
        "not JSON": post(d, b"[1,}" + SMUGGLED, "Content-Length: 4\r\n"),
        "405": b"DELETE /api/node HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + d.token.encode()
        + b"\r\n\r\n"
        + SMUGGLED,
    }[case]
    answer = exchange(d, raw, wait=REQUEST_TIMEOUT + 3)
    if case == "405":
        # Not a 400: kept alive, and RFC 9110 section 15.5.6 wants the Allow header.
        assert status_of(answer) == 405, answer
        assert b"\r\nAllow: GET\r\n\r\n" in answer, answer
        assert answer.count(b"HTTP/1.1 ") == 2, answer
    else:
        assert_refused(answer, 400)
    assert env.recorded() == []
    prove(d, before)


@pytest.mark.parametrize(
    ("path", "body"),
    [("/api/vfio", b'{"enable": 1}'), ("/api/vms", b'{"name": "x"}'), ("/api/vfio", b"[]")],
    ids=["a field refused", "a field missing", "not an object"],
)
def test_a_400_on_a_request_read_whole_keeps_the_connection(
    rig: tuple[Daemon, DaemonEnv], path: str, body: bytes
) -> None:
    """A handler's refusal of a field, on a request framed right and read whole, is a
    user's mistake, not a doubt about the framing: the connection stays open (as nginx
    does), and the CLI needs no new connection and TLS handshake. It was closed."""
    d, env = rig
    before = baseline(d)
    raw = post(d, body + SMUGGLED, f"Content-Length: {len(body)}\r\n", path=path)
    answer = exchange(d, raw, wait=REQUEST_TIMEOUT + 3)
    assert status_of(answer) == 400, answer
    first, _, rest = answer.partition(b"HTTP/1.1 200 ")
    assert b"\r\nConnection: close" not in first, first
    assert rest and b'"status"' in rest, answer  # the pipelined health check was answered
    assert env.recorded() == []
    prove(d, before)


def test_close_on_a_second_connection_line_closes(rig: tuple[Daemon, DaemonEnv]) -> None:
    """Connection options on two header lines are one list (RFC 9110 section 5.3): only
    the first line was read, and `keep-alive` then `close` kept the connection open."""
    d, _ = rig
    extra = "Connection: keep-alive\r\nConnection: close\r\n"
    answer = exchange(d, get(d, extra=extra) + SMUGGLED, wait=REQUEST_TIMEOUT + 3)
    assert status_of(answer) == 200
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"\r\nConnection: close\r\n" in answer


def test_a_client_reset_during_100_continue_is_not_an_internal_error(
    rig: tuple[Daemon, DaemonEnv],
) -> None:
    """A client that resets the connection after a head with `Expect: 100-continue`: the
    `100 Continue` write (or the body read) fails, which is the client leaving, not a
    fault. It was logged as an internal error with a traceback, and a 500."""
    d, env = rig
    before = baseline(d)
    head = post(d, b"", "Expect: 100-continue\r\nContent-Length: 2\r\n", path="/api/vms/{}/stop")
    # Reset at once (it lands on the 100 Continue write, or on the body read, or before
    # the head was read: whichever, it is routine), then once the 100 came (the body read).
    for name in ["reset-at-once"] * 4 + ["reset-after-100"]:
        s = connect_from(ATTACKER, d.port)
        s.sendall(head.replace(b"{}", name.encode()))
        if name == "reset-after-100":
            assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST, not FIN
    deadline = time.monotonic() + REQUEST_TIMEOUT + 5
    while time.monotonic() < deadline:
        if [line for line in d.lines if "/api/vms/reset-after-100/" in line]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the reset request was not logged:\n" + "\n".join(d.lines[-20:]))
    time.sleep(0.5)  # the resets at once, whichever way they ended
    assert not [line for line in d.lines if "internal error" in line], d.lines[-20:]
    assert env.recorded() == []
    prove(d, before)  # no traceback, no 500 in the access log


def test_close_among_other_connection_options_closes(rig: tuple[Daemon, DaemonEnv]) -> None:
    """RFC 9112 section 9.6: a `close` option MUST end the connection after the answer;
    `Connection: keep-alive, close` kept it open."""
    d, _ = rig
    answer = exchange(
        d, get(d, extra="Connection: keep-alive, Close\r\n") + SMUGGLED, wait=REQUEST_TIMEOUT + 3
    )
    assert status_of(answer) == 200
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"\r\nConnection: close\r\n" in answer


# ---- shapes already refused that no other test sends --------------------------------------


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("Content-Length: 16, 16\r\n", 400),
        ("Content-Length: 1 6\r\n", 400),
        ("Content-Length: 16\r\nTransfer-Encoding: chunked\r\n", 501),
        ("Content-Length: 16\r\nTransfer-Encoding: identity\r\n", 501),
        ("Content-Length: 16\r\nTransfer-Encoding: ChUnKeD\r\n", 501),
        ("Content-Length: 16\r\nTransfer-Encoding: chunked, identity\r\n", 501),
        ("Content-Length: 16\r\nTransfer-Encoding:\r\n", 501),
        ("Content-Length\t: 16\r\n", 400),
        ("X-A: a\0b\r\nContent-Length: 16\r\n", 400),
    ],
    ids=["comma list", "space inside", "CL and chunked", "identity", "chunked in odd case",
         "chunked, identity", "empty Transfer-Encoding", "tab before the colon", "NUL in a value"],
)  # fmt: skip
def test_framing_shapes_are_refused(rig: tuple[Daemon, DaemonEnv], extra: str, status: int) -> None:
    d, env = rig
    before = baseline(d)
    assert_refused(exchange(d, post(d, b'{"enable": true}' + SMUGGLED, extra)), status)
    assert env.recorded() == []
    prove(d, before)


@pytest.mark.parametrize(
    "line",
    ["CONNECT 127.0.0.1:22 HTTP/1.1", "TRACE / HTTP/1.1", "A" * 60000 + " / HTTP/1.1"],
    ids=["CONNECT", "TRACE", "a 60000-byte method"],
)
def test_methods_not_served_are_501(rig: tuple[Daemon, DaemonEnv], line: str) -> None:
    d, _ = rig
    before = baseline(d)
    raw = f"{line}\r\nHost: x\r\nAuthorization: Bearer {d.token}\r\n\r\n".encode()
    answer = exchange(d, raw + SMUGGLED)
    assert_refused(answer, 501)
    assert len(answer) < 2000, "the method was echoed whole"
    prove(d, before)


def test_absolute_form_is_served_as_its_path(rig: tuple[Daemon, DaemonEnv]) -> None:
    """RFC 9112 section 3.2.2: a server MUST accept the absolute form; the token is still
    needed, whatever the URL's host."""
    d, _ = rig
    ok = exchange(d, get(d, "http://evil.example/api/node", extra="Connection: close\r\n"))
    assert status_of(ok) == 200 and b"cpu_model" in ok, ok[:300]
    anon = b"GET HTTPS://x/api/node HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert status_of(exchange(d, anon)) == 401


def test_a_client_reset_while_its_answer_is_written_is_not_an_internal_error(
    rig: tuple[Daemon, DaemonEnv],
) -> None:
    """A client that asks for more than it reads, then resets (a browser leaving a page
    mid-download): the daemon's write fails. That is the client leaving, logged as 499;
    it was logged as an internal error with a traceback, and a 500 it then failed to send."""
    d, env = rig
    before = baseline(d)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small window: the daemon's answers fill it and the socket buffers, then its write
    # waits, and the reset lands on that write.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((ATTACKER, 0))
    s.connect(("127.0.0.1", d.port))
    try:
        # 35 KiB of app.js per answer: some MiB in all, far past any socket buffer.
        s.sendall(get(d, "/app.js?gone") * 200)
        deadline = time.monotonic() + REQUEST_TIMEOUT + 5
        while time.monotonic() < deadline:
            if [line for line in d.lines if "/app.js" in line]:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # the daemon is now waiting on a full socket
    finally:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST, not FIN
    deadline = time.monotonic() + REQUEST_TIMEOUT + 5
    while time.monotonic() < deadline:
        if [line for line in d.lines if "/app.js" in line and " 499 " in line]:
            break
        time.sleep(0.05)
    assert not [line for line in d.lines if "internal error" in line], d.lines[-20:]
    assert [line for line in d.lines if "/app.js" in line and " 499 " in line], d.lines[-20:]
    assert env.recorded() == []
    prove(d, before)
