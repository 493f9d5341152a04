"""The Transport interface: one abstract hook, one public wrapper that turns any foreign
exception into a TransportError (EXAMPLES.md B.6)."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from spk_visor.errors import REDACTED, SpkVisorError, TransportError, redact

# No answer of the daemon is this large; a bigger one is not smechvisord talking.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


class Transport(abc.ABC):
    """Sends one HTTP request to the daemon's API and returns its answer."""

    #: How errors name the node: a URL, or ssh://user@host.
    address: str

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        headers = headers or {}
        try:
            return self._request(method, path, body, headers, timeout)
        except SpkVisorError:
            raise
        except Exception as e:  # the contract: callers see only SpkVisorError
            # A library that refuses a header quotes it (requests' InvalidHeader,
            # http.client's "Invalid header value"): never repeat a token.
            text = _without_headers(f"{type(e).__name__}: {e}", headers)
            raise TransportError(f"{self.address}: {text}") from e

    @abc.abstractmethod
    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float | None,
    ) -> Response:
        """Do the request; raise TransportError (or anything, wrapped by request())."""

    def read_remote_token(self, path: str) -> str | None:
        """The node's own API token, for transports that log in to the node (SSH); None
        where the transport cannot read the node's files (HTTP)."""
        return None

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


def _without_headers(text: str, headers: dict[str, str]) -> str:
    """`text` with the values of credential headers, and each part of them, redacted."""
    for name, value in headers.items():
        if name.lower() not in ("authorization", "proxy-authorization", "cookie"):
            continue
        parts = sorted({value, *value.split(None, 1)[1:]}, key=len, reverse=True)
        for part in parts:
            if part:
                text = text.replace(part, REDACTED).replace(repr(part)[1:-1], REDACTED)
    return redact(text)
