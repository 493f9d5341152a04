"""HTTP(S) to a daemon with requests: one Session per node, timeouts on every call, a
versioned User-Agent, and errors that say what to check."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import requests

from smechvisord.version import VERSION
from spk_visor.errors import CertificateError, ConfigError, TransportError
from spk_visor.transport import tls_pinning
from spk_visor.transport.base import MAX_RESPONSE_BYTES, Response, Transport

USER_AGENT = f"spk-visor/{VERSION}"
SERVICE_HINT = "is the service running? rc-service smechvisord status"


def _is_dns_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, socket.gaierror) or "NameResolutionError" in type(cur).__name__:
            return True
        cur = (
            cur.__cause__
            or cur.__context__
            or (cur.args[0] if cur.args and isinstance(cur.args[0], BaseException) else None)
        )
    return "Name or service not known" in str(exc) or "Temporary failure in name" in str(exc)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception behind it (causes, contexts, wrapped arguments, urllib3's
    MaxRetryError.reason), each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += [x for x in (cur.__cause__, cur.__context__) if x is not None]
        todo += [a for a in cur.args if isinstance(a, BaseException)]
        reason = getattr(cur, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)


def _cert_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind `exc`, if that is what it is."""
    for cur in _causes(exc):
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur
    return None


def _pin_mismatch(exc: BaseException) -> bool:
    """Whether urllib3's fingerprint check (PinnedAdapter) refused the certificate."""
    return any("Fingerprints did not match" in str(cur) for cur in _causes(exc))


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
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        # Never send the token to a proxy from the environment: nodes are on the LAN.
        self.session.trust_env = False
        self._pinned = not self.base_url.lower().startswith("https://")
        if ca_file and not self._pinned:
            if not Path(ca_file).expanduser().is_file():
                raise ConfigError(f"--ca-file {ca_file}: no such file")
            self.session.verify = str(Path(ca_file).expanduser())
            self._pinned = True  # ordinary verification against that CA instead

    def _pin(self) -> None:
        """Before the first request: the fingerprint this node must present (may refuse)."""
        fp = tls_pinning.pin(self.base_url, self.timeout, self.accept_new)
        # The chain is not checked (self-signed); the exact certificate is, by PinnedAdapter.
        self.session.verify = False
        self.session.mount("https://", tls_pinning.PinnedAdapter(fp))
        self._pinned = True

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float | None,
    ) -> Response:
        url = self.base_url + path
        wait = timeout or self.timeout
        if not self._pinned:
            self._pin()
        try:
            resp = self.session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=wait,
                stream=True,
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as e:
            if _pin_mismatch(e):
                raise tls_pinning.changed_error(self.base_url, wait) from e
            bad_cert = _cert_failure(e)
            if bad_cert is not None:
                # Verification said no: retrying will not help (exit 3, not 7), and the
                # certificate is never accepted anyway.
                raise CertificateError(
                    f"{self.base_url}: the node's TLS certificate failed verification: "
                    f"{bad_cert.verify_message or bad_cert.reason or bad_cert}",
                    f"the URL's host name must be one the certificate names, issued by the CA "
                    f"in --ca-file {self.ca_file}; without --ca-file the node's own "
                    "certificate is pinned on first use (--accept-new); or reach the node "
                    "with --ssh, which checks its SSH host key instead",
                ) from e
            raise TransportError(
                f"TLS failed with {self.base_url}: {e}", "check the node's certificate and the URL"
            ) from e
        except requests.exceptions.ConnectTimeout as e:
            raise TransportError(
                f"no answer from {self.base_url} within {wait:g} s",
                "check the address and firewall; raise --timeout",
            ) from e
        except requests.exceptions.ConnectionError as e:
            if _is_dns_failure(e):
                host = self.base_url.split("://", 1)[-1].split("/")[0]
                raise TransportError(
                    f"cannot resolve {host}", "check the node's name or use its address"
                ) from e
            if "Connection refused" in str(e) or "ConnectionRefused" in repr(e):
                raise TransportError(f"connection refused at {self.base_url}", SERVICE_HINT) from e
            raise TransportError(f"cannot reach {self.base_url}: {e}", SERVICE_HINT) from e
        except requests.exceptions.Timeout as e:
            raise TransportError(
                f"no answer from {self.base_url} within {wait:g} s",
                "the node may be overloaded; raise --timeout",
            ) from e
        try:
            data = resp.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
        except (requests.exceptions.RequestException, OSError) as e:
            raise TransportError(f"{self.base_url}: connection lost mid-answer: {e}") from e
        finally:
            resp.close()
        if len(data) > MAX_RESPONSE_BYTES:
            raise TransportError(
                f"{self.base_url}: answer larger than {MAX_RESPONSE_BYTES} bytes; not smechvisord?"
            )
        return Response(resp.status_code, resp.headers.get("Content-Type", ""), data)

    def close(self) -> None:
        self.session.close()
