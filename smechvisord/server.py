"""HTTP mechanics: routing table, bearer auth, body and connection limits, JSON errors,
static files. What each route does lives in api.py.

Tuned per design/daemon.md's measurements: HTTP/1.1 keep-alive with a Content-Length on
every answer, TCP_NODELAY (headers and body leave as two writes; Nagle would hold the body
for the delayed ACK, ~44 ms), and a listen backlog of 128 (socketserver's 5 overflows).
"""

from __future__ import annotations

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
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from smechvisord import protocol as p
from smechvisord import tls
from smechvisord import token as tokens
from smechvisord.accesslog import AccessLog
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
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_PHRASES = {int(code) for code in HTTPStatus}


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: dict[str, Any]
    headers: Any = None


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
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.router = router
        self.token = token
        self.web_dir = web_dir.resolve()
        self.socket_timeout = socket_timeout
        # Without a certificate: plain HTTP for loopback clients, every other one refused.
        self.gate = gate or tls.Gate(None, min(tls.HANDSHAKE_DEADLINE, socket_timeout))
        self.access_log = AccessLog()
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # A cap on concurrent connections: past it, answer 503 at once from this thread
        # instead of queueing a thread per client.
        if not self._slots.acquire(blocking=False):
            body = json.dumps(ApiError(503, p.ERR_BUSY, "too many connections; retry").envelope())
            raw = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
                f"{body}"
            ).encode()
            try:
                request.settimeout(1.0)
                request.sendall(raw)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up or times out is routine, not a traceback on stderr.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client %s: %s", client_address, exc)
            return
        log.exception("error while serving %s", client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class RequestHandler(BaseHTTPRequestHandler):
    server: DaemonServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return f"smechvisord/{VERSION}"

    def setup(self) -> None:
        # TLS or plain, decided here in the connection's own thread (never the accept
        # thread), the handshake bounded by the gate's deadline. Refused raises.
        self.request = self.server.gate.accept(self.request, self.client_address)
        super().setup()
        # Socket timeout against slow or idle clients (also bounds keep-alive idling).
        self.connection.settimeout(self.server.socket_timeout)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.gate.release(self.request)

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
            or "Transfer-Encoding" in self.headers
        ):
            # No route reads a body on this method, and an unread body would be parsed as
            # the next request on this kept-alive connection: answer, then close.
            self.close_connection = True
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
            self._send_json(e.status, e.envelope())
        except Exception:
            # The path only, as in the access log: a query string may hold pasted secrets.
            log.exception(
                "internal error on %s %s", self.command, _printable(self.path.split("?")[0])
            )
            status = 500
            self._send_json(
                500, ApiError(500, p.ERR_INTERNAL, "internal error; see the daemon log").envelope()
            )
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
        route, params = self.server.router.match(self.command, path)
        if route.auth:
            self._check_auth()
        body = self._read_body() if self.command in BODY_METHODS else {}
        parsed_query = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        return route.handler(Request(self.command, path, params, parsed_query, body, self.headers))

    def _check_auth(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if not header or scheme != p.AUTH_SCHEME or not presented.strip():
            raise ApiError(
                401,
                p.ERR_UNAUTHORIZED,
                "missing bearer token: send 'Authorization: Bearer <token>' "
                "(the token is in SMECHVISORD_TOKEN_FILE on the node)",
            )
        if not tokens.matches(self.server.token, presented.strip()):
            raise ApiError(403, p.ERR_FORBIDDEN, "wrong token")

    def _read_body(self) -> dict[str, Any]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(
                411, p.ERR_LENGTH_REQUIRED, "chunked bodies are not accepted; send Content-Length"
            )
        raw_length = self.headers.get("Content-Length")
        if raw_length is None or raw_length.strip() in ("", "0"):
            self._body_read = True
            return {}
        if not _CONTENT_LENGTH.fullmatch(raw_length):
            self.close_connection = True
            raise ApiError(400, p.ERR_INVALID_JSON, "Content-Length is not a number")
        length = int(raw_length)
        if length < 0 or length > p.MAX_BODY_BYTES:
            # The body stays unread, so this connection cannot be reused.
            self.close_connection = True
            raise ApiError(
                413,
                p.ERR_PAYLOAD_TOO_LARGE,
                f"body of {length} bytes exceeds {p.MAX_BODY_BYTES}",
                {"limit": p.MAX_BODY_BYTES},
            )
        raw = self.rfile.read(length)
        self._body_read = True
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(
                415,
                p.ERR_UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type must be application/json, got {ctype or 'none'}",
            )
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, p.ERR_INVALID_JSON, f"body is not valid JSON: {e}") from None
        except RecursionError:
            # 64 KiB of '[' is valid-looking input, not a daemon fault: a 400, no traceback.
            raise ApiError(400, p.ERR_INVALID_JSON, "body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, p.ERR_INVALID_JSON, "body must be a JSON object")
        return body

    def _send_json(self, status: int, doc: Any) -> None:
        data = doc if isinstance(doc, Encoded) else json.dumps(doc).encode()
        self._send(status, data, "application/json", {"Cache-Control": "no-store"})

    def _send(self, status: int, data: bytes, ctype: str, headers: dict[str, str]) -> None:
        # The whole answer in one write: one syscall, and no small trailing segment for
        # Nagle or delayed ACKs to hold back (http.server writes headers and body apart).
        phrase = HTTPStatus(status).phrase if status in _PHRASES else "Error"
        lines = [
            f"HTTP/1.1 {status} {phrase}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(data)}",
        ]
        lines += [f"{name}: {value}" for name, value in {**SECURITY_HEADERS, **headers}.items()]
        if status == 401:
            lines.append('WWW-Authenticate: Bearer realm="smechvisord"')
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + data)

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
        phrase = HTTPStatus(code).phrase if code in _PHRASES else "Error"
        err = ApiError(
            code, p.ERR_INVALID_REQUEST if code < 500 else p.ERR_INTERNAL, message or phrase
        )
        try:
            self._send_json(code, err.envelope())
        except OSError:
            pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch writes the access log line with the timing

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def _printable(text: str) -> str:
    """`text` with control characters escaped: a request path goes into the log verbatim,
    and an escape sequence in it would act on the terminal of whoever reads the log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
