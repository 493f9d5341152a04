"""The Transport interface: one abstract hook, one public wrapper that turns any foreign
exception into a TransportError (EXAMPLES.md B.6)."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from spk_visor.errors import SpkVisorError, TransportError

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
        try:
            return self._request(method, path, body, headers or {}, timeout)
        except SpkVisorError:
            raise
        except Exception as e:  # the contract: callers see only SpkVisorError
            raise TransportError(f"{self.address}: {type(e).__name__}: {e}") from e

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
