"""How the client reaches a daemon: HTTP(S) directly, or SSH to the node's loopback.

`open_transport` picks one for a target. The SSH transport is imported only when used, so
paramiko and cryptography stay off the HTTP path (they cost ~0.2 s of start-up).
"""

from __future__ import annotations

from spk_visor.config import Target
from spk_visor.transport.base import Response, Transport

__all__ = ["Response", "Transport", "open_transport"]


def open_transport(
    target: Target,
    timeout: float,
    accept_new: bool = False,
    ca_file: str | None = None,
    insecure_http: bool = False,
) -> Transport:
    if target.ssh is not None:
        from spk_visor.transport.ssh import SshTransport  # noqa: PLC0415 (see module doc)

        return SshTransport(target, timeout=timeout, accept_new=accept_new)
    from spk_visor.transport.http import HttpTransport  # noqa: PLC0415

    return HttpTransport(
        target.url or "",
        timeout=timeout,
        accept_new=accept_new,
        ca_file=ca_file,
        insecure_http=insecure_http,
    )
