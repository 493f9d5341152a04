"""HTTP mechanics: routing table, bearer auth, body and connection limits, JSON errors,
static files. What each route does lives in api.py; who gets a worker thread (caps per
source, request deadlines, the overflow lane) in conns.py.

Tuned per design/daemon.md's measurements: HTTP/1.1 keep-alive with a Content-Length on
every answer, TCP_NODELAY (headers and body leave as two writes; Nagle would hold the body
for the delayed ACK, ~44 ms), and a listen backlog of 128 (socketserver's 5 overflows).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from smechvisord import protocol as p
from smechvisord import strict_json, tls
from smechvisord import token as tokens
from smechvisord.accesslog import AccessLog
from smechvisord.conns import Admission, Deadlines, Overflow, Watch, source_of
from smechvisord.errors import ApiError
from smechvisord.version import VERSION

log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
BODY_METHODS = ("POST", "PUT", "PATCH")
# RFC 9110: Content-Length = 1*DIGIT. int() also takes "+5", "1_0" and " 5 ": a proxy in
# front that reads the length differently would see another request boundary.
_CONTENT_LENGTH = re.compile(r"[0-9]+")
_PHRASES = {int(code) for code in HTTPStatus}
# RFC 9112 field-line: a token, a colon, then visible characters, spaces and tabs. A line
# without a colon used to end the headers silently (the rest became the body); a folded
# line (leading space) or a control character is read differently by different parsers.
# Lines end with CRLF only: a proxy that reads "Host: x\nX: y" as one field and the
# daemon as two disagree on the headers (Node.js's CVE-2023-30589).
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n")
MAX_HEADER_LINE = 8190
# RFC 9112 request-line: a token, a request-target, the version, CRLF. The target is a URI:
# visible ASCII without `#` (urlsplit drops a tab, CR or fragment a proxy would keep, and
# the daemon served "/api/no\tde" as /api/node). One match checks the usual request.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [!\x22\x24-\x7e]+ HTTP/[0-9]\.[0-9]\r\n")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/([0-9])\.[0-9]")
# RFC 9110 Host = uri-host [":" port]: a reg-name, IPv4 or [IP-literal], maybe empty.
_HOST = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%\[\]:]*")
MAX_HEADERS = 100
# Empty lines ignored before a request line (RFC 9112 section 2.2: some clients send a
# CRLF after a body); past this many the connection is closed unanswered, as before.
MAX_EMPTY_LINES = 4
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The access log's status for a request the client reset before it was answered (nginx's).
CLIENT_GONE = 499


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: dict[str, Any]
    headers: Any = None


class Headers:
    """Request header fields: names case-insensitive, every value of a repeated name
    kept (so duplicates can be refused). The lines were checked before they got here."""

    __slots__ = ("_count", "_fields")

    def __init__(self) -> None:
        self._fields: dict[str, list[str]] = {}
        self._count = 0

    def add(self, name: str, value: str) -> None:
        self._fields.setdefault(name.lower(), []).append(value)
        self._count += 1

    def get(self, name: str, default: str | None = None) -> Any:
        values = self._fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self._fields.get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __len__(self) -> int:
        return self._count


class _ClientGone(Exception):
    """The client reset or dropped the connection while its request was read or its
    answer written: routine (a browser leaving a page), nothing to answer, not a fault."""


class Encoded(bytes):
    """A JSON document a route already encoded (e.g. from its own cache)."""


Handler = Callable[[Request], tuple[int, Any]]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    auth: bool = True


@dataclass
class Router:
    routes: list[Route] = field(default_factory=list)

    def add(self, method: str, template: str, handler: Handler, auth: bool = True) -> None:
        # `{name}` matches one path segment.
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
        self.routes.append(Route(method, re.compile(f"^{regex}$"), handler, auth))

    def is_open(self, path: str) -> bool:
        """Whether a route that needs no token serves this path (by any method)."""
        return any(not r.auth and r.pattern.match(path) for r in self.routes)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for route in self.routes:
            m = route.pattern.match(path)
            if m is None:
                continue
            if route.method == method:
                return route, {k: unquote(v) for k, v in m.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            raise ApiError(
                405,
                p.ERR_METHOD_NOT_ALLOWED,
                f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                {"allowed": allowed},
            )
        raise ApiError(404, p.ERR_NOT_FOUND, f"no API route {path}", {"path": path})


class DaemonServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        router: Router,
        token: str,
        web_dir: Path,
        max_connections: int,
        socket_timeout: float,
        gate: tls.Gate | None = None,
        per_source: int | None = None,
        head_timeout: float = 10.0,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.router = router
        self.token = token
        self.web_dir = web_dir.resolve()
        self.socket_timeout = socket_timeout
        # Without a certificate: plain HTTP for loopback clients, every other one refused.
        self.gate = gate or tls.Gate(None, min(tls.HANDSHAKE_DEADLINE, socket_timeout))
        self.head_timeout = head_timeout
        self.access_log = AccessLog()
        self.admission = Admission(max_connections, per_source or max_connections)
        self.deadlines = Deadlines()
        self.overflow = Overflow(self.overflow_answer)
        super().__init__(address, RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Past the caps, the overflow lane answers (health, or 503) without a worker: the
        # accept thread never waits on a client.
        source = source_of(str(client_address[0]))
        if not self.admission.enter(source):
            if self.plain_overflow and tls.is_loopback(str(client_address[0])):
                self.overflow.add(request)
            else:
                self.shutdown_request(request)  # a TLS port: no plain-text answer
            return
        try:
            threading.Thread(
                target=self._serve_connection,
                args=(request, client_address, source),
                daemon=True,
            ).start()
        except BaseException:
            self.admission.leave(source)
            self.shutdown_request(request)
            raise

    def _serve_connection(self, request: Any, client_address: Any, source: str) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.admission.leave(source)
            self.shutdown_request(request)

    # The overflow lane answers in plain HTTP, so it takes only loopback clients (the
    # node's own health probes, which must get through even under attack); over-cap
    # connections from elsewhere would be speaking TLS, and are closed instead.
    plain_overflow = True

    def wrap_connection(self, sock: socket.socket, peer: tuple[str, int]) -> socket.socket:
        """The per-connection transport: TLS, or plain for a loopback client (the gate
        decides by the first byte, and refuses plain text from elsewhere). It runs on the
        worker thread, under the request deadline, so a handshake that trickles in is
        ended like a request head that does."""
        return self.gate.accept(sock, peer)

    def overflow_answer(self, head: bytes) -> bytes:
        """What the overflow lane sends: the routes that need no token (GET /api/health),
        else 503. Always closes the connection."""
        words = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        method = words[0].decode("latin-1") if words else ""
        target = words[1].decode("latin-1") if len(words) == 3 else ""
        path = urlsplit(target).path if target.startswith("/") else ""
        if method in ("GET", "HEAD"):
            try:
                route, params = self.router.match("GET", path)
            except ApiError:
                route = None
            if route is not None and not route.auth:
                try:
                    status, doc = route.handler(Request("GET", path, params, {}, {}))
                    return response_bytes(status, _encode(doc), JSON_HEADERS, close=True,
                                          head_only=method == "HEAD")  # fmt: skip
                except Exception:
                    log.exception("overflow answer for %s failed", _printable(path))
        err = ApiError(
            503,
            p.ERR_BUSY,
            "too many connections from this address or in all; retry",
        )
        return response_bytes(
            503,
            _encode(err.envelope()),
            {**JSON_HEADERS, "Retry-After": "1"},
            close=True,
            head_only=method == "HEAD",
        )

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up or times out is routine, not a traceback on stderr.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s: %s", client_address, exc)
            return
        log.exception("error while serving %s", client_address)

    def server_close(self) -> None:
        self.deadlines.stop()
        super().server_close()


class RequestHandler(BaseHTTPRequestHandler):
    server: DaemonServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return f"smechvisord/{VERSION}"

    def setup(self) -> None:
        # The request deadline starts at accept: a TLS handshake (wrap_connection) and
        # the first request head must both be in within head_timeout.
        self._watch: Watch = self.server.deadlines.watch(self.request)
        self._first = True
        self.server.deadlines.arm(self._watch, self.server.head_timeout)
        try:
            self.request = self.server.wrap_connection(self.request, self.client_address)
        except BaseException:
            # A refused or failed handshake never reaches finish(): let go of the watch here.
            self.server.deadlines.release(self._watch)
            raise
        super().setup()
        # Per-call socket timeout for bodies and writes, against clients that stall. No
        # longer than the request deadline: every read is under it anyway, and then the
        # usual request needs no settimeout (a system call) to bound its reads.
        self._base_timeout = min(self.server.socket_timeout, self.server.head_timeout)
        self.connection.settimeout(self._base_timeout)
        self._timeout = self._base_timeout

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.deadlines.release(self._watch)
            self.server.gate.release(self.request)

    def handle_one_request(self) -> None:
        """One request on this connection. Unlike http.server's, the idle wait and the
        request head are bounded by one total deadline, and the head is read strictly."""
        deadlines = self.server.deadlines
        if not self._first:
            deadlines.arm(self._watch, self.server.head_timeout)
        self._first = False
        self._head_begun = False
        self._head_buffered = False
        self._answered = False
        timed_out = False
        try:
            ok = self._read_head()
        except OSError as e:  # timeouts included: the client stalled or went away
            ok = False
            self.close_connection = True
            timed_out = isinstance(e, TimeoutError)
        finally:
            if deadlines.disarm(self._watch):
                ok = False
                timed_out = True
                self.close_connection = True
        if not ok:
            if timed_out and self._head_begun and not self._answered:
                # Part of a request came, then nothing: say so (408, as nginx does), rather
                # than close without a word. A connection that sent nothing gets nothing,
                # and one already refused (400, 431, ...) no second answer.
                self._send_timeout()
            return
        self._bound_reads(None)
        try:
            getattr(self, "do_" + self.command, self._unsupported)()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True

    def _unsupported(self) -> None:
        # The method is echoed cut short: a request line may be 64 KiB.
        method = self.command if len(self.command) <= 40 else self.command[:40] + "..."
        self.send_error(501, f"method {method} is not supported")

    def _read_head(self) -> bool:
        """Request line and header lines, refused (and the connection closed) at the first
        framing a proxy in front could read differently: a line not ended by CRLF, a
        request line that is not token, URI and version, a header line without a colon,
        a folded or control-character line, two Content-Length, Host or Authorization
        headers, any Transfer-Encoding, an HTTP/1.1 request without one valid Host."""
        self.command, self.requestline, self.request_version = "", "", "HTTP/0.9"
        self.close_connection = True
        raw = self._readline(65537)
        for _ in range(MAX_EMPTY_LINES):
            if raw != b"\r\n":
                break
            # An empty line begins no request (an idle connection after it gets no 408),
            # and a buffer that began with two says nothing of the head after them: it is
            # read under the deadline unless it is in the buffer whole.
            self._head_begun = self._head_buffered = False
            raw = self._readline(65537)
        self.raw_requestline = raw
        if len(raw) > 65536:
            self.send_error(414, "request line too long")
            return False
        if not raw.endswith(b"\n"):
            return False  # cut short: the client left or ran out of time (the caller says)
        if raw == b"\r\n":
            return False  # blank lines and nothing else: nothing to answer
        if _REQUEST_LINE.fullmatch(raw) is None:
            self._refuse_request_line(raw)
            return False
        # ASCII, three words split by single spaces: the match above says so. Parsed here
        # rather than by http.server, whose header parser (the email package) cost more
        # than the rest of a GET /api/node.
        self.requestline = raw[:-2].decode("ascii")
        method, target, version = self.requestline.split(" ")
        self.command, self.path, self.request_version = method, target, version
        if version[5] != "1":
            self.send_error(505, "only HTTP/1.0 and HTTP/1.1 are served")
            return False
        if target[0] != "/" and not self._other_target_form():
            return False
        headers = Headers()
        while True:
            line = self._readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                self.send_error(431, f"a header line is longer than {MAX_HEADER_LINE} bytes")
                return False
            if not line.endswith(b"\n"):
                return False  # the head was cut short: the client left or ran out of time
            if line == b"\r\n":
                break
            if len(headers) >= MAX_HEADERS:
                self.send_error(431, f"more than {MAX_HEADERS} header lines")
                return False
            if not _FIELD_LINE.fullmatch(line):
                self.send_error(
                    400,
                    "malformed header line: each must be 'Name: value' ended by CRLF (no "
                    "folding, no control characters)",
                )
                return False
            name, _, value = line.decode("latin-1").partition(":")
            headers.add(name, value.strip())
        self.headers = headers  # type: ignore[assignment]
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")  # never an open redirect's //host
        lines = headers.get_all("Connection")
        connection = lines[0].lower() if len(lines) == 1 else ""
        if len(lines) > 1 or "," in connection:
            # RFC 9112 section 9.6: a close option among others closes too, on any of the
            # Connection lines (together one list, RFC 9110 section 5.3).
            options = {o.strip() for o in ",".join(lines).lower().split(",")}
            connection = next((o for o in ("close", "keep-alive") if o in options), "")
        self.close_connection = connection == "close" or (
            version == "HTTP/1.0" and connection != "keep-alive"
        )
        # Two Authorization headers: which token was checked would depend on the reader.
        for name in ("Content-Length", "Host", "Authorization"):
            if len(self.headers.get_all(name) or ()) > 1:
                self.close_connection = True
                self.send_error(400, f"more than one {name} header")
                return False
        if self.headers.get_all("Transfer-Encoding"):
            self.close_connection = True
            self.send_error(
                501, "Transfer-Encoding is not supported; send the body with Content-Length"
            )
            return False
        # RFC 9112 section 3.2: an HTTP/1.1 request without Host, or with an invalid one,
        # MUST get a 400 (HTTP/1.0 may leave it out).
        host = headers.get("Host")
        if host is None:
            if version != "HTTP/1.0":
                self.send_error(400, "the Host header is missing (required since HTTP/1.1)")
                return False
        elif not _HOST.fullmatch(host):
            self.send_error(400, "the Host header is not a host name or address")
            return False
        # `Expect: 100-continue` is answered when the body is about to be read (_read_body),
        # after the token and the framing were checked: never to a request refused unread.
        return True

    def _refuse_request_line(self, raw: bytes) -> None:
        """The 400 (or 505) for a request line that is not METHOD SP TARGET SP HTTP/1.x
        CRLF, saying what is wrong with it."""
        line = raw.decode("latin-1")
        self.requestline = line.rstrip("\r\n")
        words = line[:-2].split(" ") if line.endswith("\r\n") else []
        if not line.endswith("\r\n"):
            message = "the request line must end with CRLF"
        elif len(words) != 3 or "" in words:
            # Exactly three parts split by single spaces (RFC 9112); str.split() would
            # also split on the latin-1 no-break space.
            message = "malformed request line; expected METHOD TARGET HTTP/1.1"
        elif (m := _VERSION.fullmatch(words[2])) is None:
            message = f"bad HTTP version {_printable(words[2][:20])!r}"
        elif m.group(1) != "1":
            self.send_error(505, "only HTTP/1.0 and HTTP/1.1 are served")
            return
        elif not _TOKEN.fullmatch(words[0]):
            message = "the method is not a token (letters, digits, !#$%&'*+-.^_`|~)"
        else:
            message = (
                "the request target holds a character a URL cannot (a control character, "
                "a space, non-ASCII or '#'); percent-encode it"
            )
        self.send_error(400, message)

    def _other_target_form(self) -> bool:
        """A target that is not a path: `*` for OPTIONS, the authority of a CONNECT (501
        later), or an absolute http(s) URL, which a server MUST accept (RFC 9112 section
        3.2.2) and is served as its path. Anything else is refused (400)."""
        target = self.path
        if self.command == "CONNECT" or (target == "*" and self.command == "OPTIONS"):
            return True
        if target[:8].lower().startswith(("http://", "https://")):
            url = urlsplit(target)
            self.path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            return True
        self.send_error(
            400, "the request target must be a path (/...), an http(s) URL, or * for OPTIONS"
        )
        return False

    def _readline(self, limit: int) -> bytes:
        """One line of the head, at most one socket read at a time, each bounded by the
        request deadline (readline would read on, a full socket timeout per read, for a
        client that trickles). Notes that a request has begun once a byte of it came."""
        rfile = self.rfile
        if self._head_buffered:
            return rfile.readline(limit)  # the fast path: no socket read, nothing to bound
        deadlines = self.server.deadlines
        line = b""
        while True:
            self._bound_reads(deadlines.remaining(self._watch))
            buf = rfile.peek(1)  # type: ignore[attr-defined]  # buffered, or one read
            if not buf:
                return line  # end of stream
            self._head_begun = True
            if not line and (b"\r\n\r\n" in buf or b"\n\n" in buf):
                # The whole head is in the buffer (the usual case): read it by line in C.
                self._head_buffered = True
                return rfile.readline(limit)
            want = limit - len(line)
            end = buf.find(b"\n", 0, want)
            if end >= 0:
                return line + rfile.read(end + 1)
            line += rfile.read(min(len(buf), want))
            if len(line) >= limit:
                return line

    def _bound_reads(self, left: float | None) -> None:
        """The next read waits at most the base timeout, and never past the request
        deadline (`left` seconds away): the worker then sees the deadline as a read
        timeout and can still answer 408, TLS included (the watchdog's shutdown, which
        only comes after BACKSTOP_GRACE, ends a TLS stream)."""
        if left is not None and left <= 0:
            # Past the deadline: time is up even if every read still returns in time (a
            # client sending a byte every few ms), or the watchdog's cut comes first.
            raise TimeoutError("request deadline")
        t = self._base_timeout
        if left is not None and left < t:
            if self._timeout <= left + 0.05:
                return  # already bounded closely enough: no system call per line
            t = max(left, 0.01)  # 0 would mean non-blocking, not "time is up"
        if t != self._timeout:
            self.connection.settimeout(t)
            self._timeout = t

    def _send_timeout(self) -> None:
        self.close_connection = True
        # A client that does not read either must not hold this worker for a whole
        # socket timeout: the answer is small, and dropped if it does not go at once.
        with contextlib.suppress(OSError):
            self.connection.settimeout(min(1.0, self.server.socket_timeout))
        self.send_error(
            408,
            f"the request did not arrive whole within {self.server.head_timeout:g} s",
        )

    # Every method goes through one dispatcher so unknown methods get a JSON 405 too.
    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        started = time.monotonic()
        status = 500
        self._body_read = False
        if self.command not in BODY_METHODS and (
            self.headers.get("Content-Length", "0").strip() != "0"
        ):
            # No route reads a body on this method, and an unread body would be parsed as
            # the next request on this kept-alive connection: answer, then close.
            self.close_connection = True
        try:
            try:
                url = urlsplit(self.path)
                path = url.path
                if path == p.API_PREFIX or path.startswith(p.API_PREFIX + "/"):
                    status, doc = self._api(path, url.query)
                    self._send_json(status, doc)
                else:
                    status = self._static(path)
            except ApiError as e:
                status = e.status
                if self.command in BODY_METHODS and not self._body_read:
                    # Refused before the body was read: it would be parsed as the next request.
                    self.close_connection = True
                allowed = e.details.get("allowed") if e.status == 405 else None
                # RFC 9110 section 15.5.6: a 405 names the methods allowed in an Allow header.
                self._send_json(
                    e.status, e.envelope(), {"Allow": ", ".join(allowed)} if allowed else None
                )
            except _ClientGone:
                # The client reset the connection mid-request: routine, and nothing to answer.
                self.close_connection = True
                status = CLIENT_GONE
            except Exception:
                # The path only, as in the access log: a query string may hold pasted secrets.
                log.exception(
                    "internal error on %s %s", self.command, _printable(self.path.split("?")[0])
                )
                status = 500
                self._send_json(
                    500,
                    ApiError(500, p.ERR_INTERNAL, "internal error; see the daemon log").envelope(),
                )
        except _ClientGone:
            # The answer (or the 500 for a fault) could not be written: the client left.
            self.close_connection = True
            status = CLIENT_GONE
        finally:
            elapsed = (time.monotonic() - started) * 1000
            self.server.access_log.write(
                self.client_address[0],
                str(self.command),
                _printable(self.path.split("?")[0]),
                status,
                elapsed,
            )

    def _api(self, path: str, query: str) -> tuple[int, Any]:
        try:
            route, params = self.server.router.match(self.command, path)
        except ApiError:
            # 404 and 405 would map the API for anyone: without the token, only the open
            # routes (GET /api/health) say anything (docs/security.md).
            if not self.server.router.is_open(path):
                self._check_auth()
            raise
        if route.auth:
            self._check_auth()
        body = self._read_body() if self.command in BODY_METHODS else {}
        parsed_query = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        return route.handler(Request(self.command, path, params, parsed_query, body, self.headers))

    def _check_auth(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        # The scheme name is case-insensitive (RFC 9110 11.1): some clients send "bearer".
        if not header or scheme.lower() != p.AUTH_SCHEME.lower() or not presented.strip():
            raise ApiError(
                401,
                p.ERR_UNAUTHORIZED,
                "missing bearer token: send 'Authorization: Bearer <token>' "
                "(the token is in SMECHVISORD_TOKEN_FILE on the node)",
            )
        if not tokens.matches(self.server.token, presented.strip()):
            raise ApiError(403, p.ERR_FORBIDDEN, "wrong token")

    def _read_body(self) -> dict[str, Any]:
        raw_length = self.headers.get("Content-Length")
        if raw_length is None or raw_length.strip() in ("", "0"):
            self._body_read = True
            return {}
        if not _CONTENT_LENGTH.fullmatch(raw_length):
            self.close_connection = True
            raise ApiError(400, p.ERR_INVALID_JSON, "Content-Length is not a number")
        # Any run of digits is a length, past 18 of them just too large (and never given
        # to int(): thousands of digits would cost time, or raise).
        digits = raw_length.lstrip("0")
        length = int(digits or "0") if len(digits) <= 18 else 10**18
        if length > p.MAX_BODY_BYTES:
            # The body stays unread, so this connection cannot be reused.
            self.close_connection = True
            raise ApiError(
                413,
                p.ERR_PAYLOAD_TOO_LARGE,
                f"body of {length if len(digits) <= 18 else 'over 10**18'} bytes exceeds "
                f"{p.MAX_BODY_BYTES}",
                {"limit": p.MAX_BODY_BYTES},
            )
        if (
            self.request_version != "HTTP/1.0"
            and self.headers.get("Expect", "").lower() == "100-continue"
        ):
            # Only now, with the token, the route and the length checked: the client is
            # asked for a body the daemon will read, never for one it refuses unread.
            try:
                self.wfile.write(CONTINUE)
            except OSError:
                raise _ClientGone from None
        # The body shares the request deadline: 64 KiB at a byte per call would
        # otherwise hold this worker for days.
        deadlines = self.server.deadlines
        deadlines.arm(self._watch, self.server.head_timeout)
        cut = False
        raw = b""
        try:
            # One socket read at a time, each bounded by what is left of the deadline.
            while len(raw) < length:
                self._bound_reads(deadlines.remaining(self._watch))
                chunk = self.rfile.read1(length - len(raw))
                if not chunk:
                    break
                raw += chunk
        except TimeoutError:
            raw, cut = b"", True  # the deadline or the per-read socket timeout: a stall
        except OSError:
            raise _ClientGone from None  # reset mid-body: nothing to answer
        finally:
            cut = deadlines.disarm(self._watch) or cut
            self._bound_reads(None)
        if cut:
            self.close_connection = True
            # The answer goes out on a short send timeout (see _send_timeout).
            with contextlib.suppress(OSError):
                self.connection.settimeout(min(1.0, self.server.socket_timeout))
            raise ApiError(
                408,
                p.ERR_REQUEST_TIMEOUT,
                f"the body did not arrive whole within {self.server.head_timeout:g} s",
            )
        if len(raw) < length:
            self.close_connection = True
            raise ApiError(400, p.ERR_INVALID_JSON, "the body ended before Content-Length")
        self._body_read = True
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(
                415,
                p.ERR_UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type must be application/json, got {ctype or 'none'}",
            )
        try:
            body = strict_json.loads(raw)
        except strict_json.StrictJsonError as e:
            # A body that does not parse is the sign of a wrong Content-Length: what
            # follows it must not be read as the next request.
            self.close_connection = True
            raise ApiError(400, p.ERR_INVALID_JSON, f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, p.ERR_INVALID_JSON, "body must be a JSON object")
        return body

    def _send_json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        extra = (
            {"Cache-Control": "no-store", **headers} if headers else {"Cache-Control": "no-store"}
        )
        self._send(status, _encode(doc), "application/json", extra)

    def _send(self, status: int, data: bytes, ctype: str, headers: dict[str, str]) -> None:
        answer = response_bytes(
            status,
            data,
            {"Content-Type": ctype, **headers},
            close=self.close_connection,
            head_only=self.command == "HEAD",
        )
        try:
            self.wfile.write(answer)
        except OSError:
            # Reset, closed, or not reading within the socket timeout: the answer cannot
            # go, and a second one (a 500) would fail the same way.
            raise _ClientGone from None

    def _static(self, path: str) -> int:
        if self.command not in ("GET", "HEAD"):
            raise ApiError(
                405,
                p.ERR_METHOD_NOT_ALLOWED,
                f"{self.command} is not allowed here",
                {"allowed": ["GET", "HEAD"]},
            )
        name = unquote(path).lstrip("/") or "index.html"
        root = self.server.web_dir
        # A NUL (%00) makes the path calls raise ValueError: not a page, not a 500.
        target = None if "\0" in name else (root / name).resolve()
        # Resolve first, then require the result inside the web root: no `..` or symlink exits.
        if target is None or not target.is_relative_to(root) or not target.is_file():
            raise ApiError(404, p.ERR_NOT_FOUND, f"no such page {path}", {"path": path})
        data = target.read_bytes()
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        self._send(200, data, ctype, {"Cache-Control": "no-cache"})
        return 200

    # http.server's own errors (bad request line, oversized headers) as JSON too.
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        self._answered = True  # no 408 after this (handle_one_request)
        phrase = HTTPStatus(code).phrase if code in _PHRASES else "Error"
        kind = p.ERR_INVALID_REQUEST if code < 500 else p.ERR_INTERNAL
        if code == 408:
            kind = p.ERR_REQUEST_TIMEOUT
        # 501 and 505 are the client asking for what this server does not do, not a fault.
        err = ApiError(
            code, p.ERR_NOT_IMPLEMENTED if code in (501, 505) else kind, message or phrase
        )
        with contextlib.suppress(_ClientGone):
            self._send_json(code, err.envelope())

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch writes the access log line with the timing

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


JSON_HEADERS = {"Content-Type": "application/json", "Cache-Control": "no-store"}


def _encode(doc: Any) -> bytes:
    return doc if isinstance(doc, Encoded) else json.dumps(doc).encode()


_DATE: dict[int, str] = {}


def http_date() -> str:
    """The Date header, formatted once a second (formatdate costs as much as the access
    log line)."""
    now = int(time.time())
    text = _DATE.get(now)
    if text is None:
        text = formatdate(now, usegmt=True)
        _DATE.clear()  # one entry: the current second
        _DATE[now] = text
    return text


def response_bytes(
    status: int,
    data: bytes,
    headers: dict[str, str],
    *,
    close: bool,
    head_only: bool = False,
    date: str | None = None,
) -> bytes:
    """A whole answer as one buffer: one write, and no small trailing segment for Nagle
    or delayed ACKs to hold back (http.server writes headers and body apart)."""
    phrase = HTTPStatus(status).phrase if status in _PHRASES else "Error"
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Server: smechvisord/{VERSION}",
        f"Date: {date or http_date()}",
        f"Content-Length: {len(data)}",
    ]
    lines += [f"{name}: {value}" for name, value in {**SECURITY_HEADERS, **headers}.items()]
    if status == 401:
        lines.append('WWW-Authenticate: Bearer realm="smechvisord"')
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + data


def _printable(text: str) -> str:
    """`text` with control characters escaped: a request path goes into the log verbatim,
    and an escape sequence in it would act on the terminal of whoever reads the log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
