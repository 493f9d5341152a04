"""HTTP(S) to a daemon with the standard library's http.client: one kept-alive connection
per node, one total deadline per request, a versioned User-Agent, and errors that say what
to check.

Not requests: importing it (and urllib3) cost ~70 ms of every `spk-visor` start, and
building and merging its per-request settings ~1 ms of CPU per node of a fleet, for
features the daemon's API does not use. What this keeps of requests' behaviour as the
CLI used it: no proxy and no .netrc from the environment (nodes are on the LAN, and the
token must not go to a proxy), redirects not followed, the answer read up to a cap.
What changed: the deadline (--timeout) is the request's whole time, not each wait, and
a body is asked for uncompressed (`Accept-Encoding: identity`; the daemon never
compresses).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

from smechvisord.version import VERSION
from spk_visor.errors import (
    WRONG_SERVICE_HINT,
    CertificateError,
    ConfigError,
    ProtocolError,
    TransportError,
)
from spk_visor.transport import tls_pinning
from spk_visor.transport.base import MAX_RESPONSE_BYTES, Response, Transport
from spk_visor.transport.deadline import Deadline, DeadlineSocket

USER_AGENT = f"spk-visor/{VERSION}"
SERVICE_HINT = "is the service running? rc-service smechvisord status"
# Safe to send again on a fresh connection when a kept-alive one turns out dead before
# any answer: the first attempt cannot have reached the daemon's handler.
_RETRYABLE = frozenset({"GET", "HEAD"})


class _Connection(http.client.HTTPConnection):
    """http.client's framing over a socket the transport opened itself (so that each
    failure of connecting is named for what it is)."""

    sock: DeadlineSocket | None

    def connect(self) -> None:
        # The transport opens every connection; http.client's auto-open must not.
        raise http.client.NotConnected("no connection open")


class HttpTransport(Transport):
    """`https://` nodes are held to their pinned certificate (tls_pinning), or verified
    against `ca_file`; `http://` is refused beyond loopback unless `insecure_http`."""

    def __init__(
        self,
        base_url: str,
        timeout: float,
        accept_new: bool = False,
        ca_file: str | None = None,
        insecure_http: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.address = self.base_url
        self.timeout = timeout
        self.accept_new = accept_new
        self.ca_file = ca_file
        tls_pinning.check_plain_url(self.base_url, insecure_http)
        where = tls_pinning.Endpoint.of(self.base_url)
        self._host, self._port = where.host, where.port
        self._prefix = urlsplit(self.base_url).path.rstrip("/")
        self._tls = self.base_url.lower().startswith("https://")
        self._context: ssl.SSLContext | None = None
        self._fingerprint: str | None = None  # the pin, once looked up
        if self._tls and ca_file:
            path = Path(ca_file).expanduser()
            if not path.is_file():
                # A folder or a device exists: "no such file" would send the admin
                # looking for a typo. OpenSSL is never handed one (a device never ends).
                if path.is_dir():
                    why = "is a folder, not a file"
                else:
                    why = "is not a regular file" if path.exists() else "no such file"
                raise ConfigError(f"--ca-file {ca_file}: {why}")
            self._context = tls_pinning.client_context(str(path))
        self._conn: _Connection | None = None
        self._lock = threading.Lock()

    # ---- connecting --------------------------------------------------------------------

    def _pin(self) -> None:
        """Before the first request: the fingerprint this node must present (may refuse)."""
        self._fingerprint = tls_pinning.pin(self.base_url, self.timeout, self.accept_new)
        # The chain is not checked (self-signed); the exact certificate is, in _open.
        self._context = tls_pinning.client_context(None)

    def _open(self, deadline: Deadline) -> DeadlineSocket:
        """A connected socket (TLS done and its certificate accepted) within `deadline`."""
        url = self.base_url
        try:
            raw = _tcp(self._host, self._port, deadline.left())
        except socket.gaierror as e:
            host = url.split("://", 1)[-1].split("/")[0]
            raise TransportError(
                f"cannot resolve {host}", "check the node's name or use its address"
            ) from e
        except ConnectionRefusedError as e:
            raise TransportError(f"connection refused at {url}", SERVICE_HINT) from e
        except TimeoutError as e:
            raise TransportError(
                f"no answer from {url} within {deadline.seconds:g} s",
                "check the address and firewall; raise --timeout",
            ) from e
        except OSError as e:
            raise TransportError(f"cannot reach {url}: {e.strerror or e}", SERVICE_HINT) from e
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is None:
                return DeadlineSocket(raw, deadline)
            raw.settimeout(deadline.left())
            return DeadlineSocket(self._handshake(raw, self._context, deadline), deadline)
        except BaseException:
            raw.close()
            raise

    def _handshake(
        self, raw: socket.socket, context: ssl.SSLContext, deadline: Deadline
    ) -> ssl.SSLSocket:
        url = self.base_url
        pinned = self._fingerprint
        # With a CA the name is verified, so it is always given; SNI itself carries names
        # only (tls_pinning._sni).
        name = self._host if pinned is None else tls_pinning.sni(self._host)
        try:
            tls = context.wrap_socket(raw, server_hostname=name)
        except ssl.SSLCertVerificationError as e:
            # Verification said no: retrying will not help (exit 3, not 7), and the
            # certificate is never accepted anyway.
            raise CertificateError(
                f"{url}: the node's TLS certificate failed verification: "
                f"{e.verify_message or e.reason or e}",
                f"the URL's host name must be one the certificate names, issued by the CA "
                f"in --ca-file {self.ca_file}; without --ca-file the node's own "
                "certificate is pinned on first use (--accept-new); or reach the node "
                "with --ssh, which checks its SSH host key instead",
            ) from e
        except ssl.SSLError as e:
            raise TransportError(
                f"TLS failed with {url}: {e.reason or e}",
                "check the node's certificate and the URL",
            ) from e
        except TimeoutError as e:
            raise self._no_answer(deadline) from e
        except OSError as e:
            raise TransportError(f"cannot reach {url}: {e.strerror or e}", SERVICE_HINT) from e
        if pinned is not None:
            der = tls.getpeercert(binary_form=True)
            if not tls_pinning.matches(der, pinned):
                # Before a byte of the request (and so the token) is sent.
                tls.close()
                now = tls_pinning.fingerprint(der) if der else "(no certificate)"
                raise tls_pinning.changed_error(url, deadline.seconds, now=now)
        return tls

    # ---- one request ---------------------------------------------------------------------

    def _no_answer(self, deadline: Deadline) -> TransportError:
        return TransportError(
            f"no answer from {self.base_url} within {deadline.seconds:g} s",
            "the node may be overloaded; raise --timeout",
        )

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float | None,
    ) -> Response:
        deadline = Deadline(timeout or self.timeout)
        with self._lock:
            if self._tls and self._context is None:
                self._pin()
            for attempt in (1, 2):
                conn, reused = self._connection(deadline)
                try:
                    return self._exchange(conn, method, path, body, headers, deadline)
                except _StaleConnection as e:
                    if attempt == 2 or not reused or method not in _RETRYABLE:
                        raise e.error from e.__cause__
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self, deadline: Deadline) -> tuple[_Connection, bool]:
        """The kept-alive connection when it is still good, else a new one."""
        conn = self._conn
        if conn is not None and conn.sock is not None and not conn.sock.readable_now():
            conn.sock.deadline = deadline
            return conn, True
        if conn is not None:
            # Closed by the peer, or holding bytes nobody asked for (a body longer than
            # its Content-Length): never read from again.
            conn.close()
            self._conn = None
        conn = _Connection(self._host, self._port)
        if self._tls:
            conn.default_port = 443  # no ":443" in the Host header, as browsers send it
        conn.sock = self._open(deadline)
        self._conn = conn
        return conn, False

    def _exchange(
        self,
        conn: _Connection,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        deadline: Deadline,
    ) -> Response:
        url = self.base_url
        try:
            try:
                conn.request(
                    method,
                    self._prefix + path,
                    body=body,
                    headers={"User-Agent": USER_AGENT, **headers},
                )
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                raise _StaleConnection(
                    TransportError(
                        f"cannot reach {url}: the connection closed without an answer",
                        SERVICE_HINT,
                    )
                ) from e
            try:
                data = self._body(resp)
            finally:
                resp.close()
        except _StaleConnection:
            self._drop(conn)
            raise
        except TimeoutError as e:
            self._drop(conn)
            raise self._no_answer(deadline) from e
        except ssl.SSLError as e:
            self._drop(conn)
            raise TransportError(f"TLS failed with {url}: {e.reason or e}") from e
        except http.client.BadStatusLine as e:
            # Something is listening and said something that is not HTTP (sshd's banner on
            # a mistyped port): the node is up, so "is the service running" and exit 7
            # (retry later) would point the wrong way; the address is what is wrong.
            self._drop(conn)
            line = str(e.args[0] if e.args else "").strip()[:80]
            raise ProtocolError(
                f"{url} answered, but not HTTP: {line!r}", WRONG_SERVICE_HINT
            ) from e
        except (http.client.HTTPException, OSError) as e:
            self._drop(conn)
            raise TransportError(
                f"cannot reach {url}: not an HTTP answer: {type(e).__name__}: {e}", SERVICE_HINT
            ) from e
        except BaseException:
            self._drop(conn)
            raise
        return Response(resp.status, resp.getheader("Content-Type", "") or "", data)

    def _body(self, resp: http.client.HTTPResponse) -> bytes:
        url = self.base_url
        if resp.length is not None and resp.length > MAX_RESPONSE_BYTES:
            raise TransportError(
                f"{url}: answer larger than {MAX_RESPONSE_BYTES} bytes; not smechvisord?"
            )
        try:
            # Chunked, sized or closed-delimited alike: at most one byte past the cap.
            data = resp.read(MAX_RESPONSE_BYTES + 1)
        except (http.client.HTTPException, OSError) as e:
            if isinstance(e, TimeoutError):
                raise
            raise TransportError(f"{url}: connection lost mid-answer: {e}") from e
        if len(data) > MAX_RESPONSE_BYTES:
            raise TransportError(
                f"{url}: answer larger than {MAX_RESPONSE_BYTES} bytes; not smechvisord?"
            )
        if resp.length:  # http.client counts down what is left of a Content-Length
            raise TransportError(
                f"{url}: connection lost mid-answer: "
                f"{len(data)} bytes of {len(data) + resp.length} received"
            )
        return data

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        if self._conn is conn:
            self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _tcp(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to `host`. An address is connected to as it is: getaddrinfo
    would encode it with the "idna" codec first, whose import (stringprep, unicodedata)
    costs every start of the CLI more than the whole lookup is worth."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.create_connection((host, port), timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _StaleConnection(Exception):
    """The connection died before any answer: `error` unless it may be tried again."""

    def __init__(self, error: TransportError) -> None:
        super().__init__(error.message)
        self.error = error
