"""Trust on first use for a node's TLS certificate, the way SSH treats host keys.

A node makes its own self-signed certificate at first start, so there is no CA to check
it against. The CLI remembers each node's certificate fingerprint in ``known_certs``
(``~/.config/spk-visor/known_certs``, or ``$SPK_VISOR_KNOWN_CERTS``), one line per
``host:port``::

    alpha.example:8080 sha256 AB:CD:...:EF

- unknown node: refused (exit 3) with the fingerprint to compare with the node's own
  (``smechvisord --print-fingerprint``); ``--accept-new`` records it;
- a node whose certificate changed: refused (exit 3) showing both fingerprints;
  ``--accept-new`` never replaces a known one;
- ``--ca-file``: no pinning, ordinary verification (chain and host name) against that CA.

After every handshake the HTTP transport compares the peer certificate's SHA-256 with the
pinned one (`matches`) before a byte of the request, and so the token, is sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spk_visor.capped_read import read_at_most, regular_size
from spk_visor.errors import CertificateError, ConfigError, TransportError

log = logging.getLogger(__name__)

KNOWN_CERTS_ENV = "SPK_VISOR_KNOWN_CERTS"
MAX_KNOWN_CERTS_BYTES = 1 << 20
ALGORITHM = "sha256"
_LOCK = threading.Lock()  # fleet commands record from several threads


def fingerprint(der: bytes) -> str:
    """Colon-separated upper-case SHA-256 hex, as `smechvisord --print-fingerprint`,
    `openssl x509 -fingerprint -sha256` and browsers show it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def known_certs_path(environ: Any = None) -> Path:
    env = os.environ if environ is None else environ
    explicit = env.get(KNOWN_CERTS_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "spk-visor" / "known_certs"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigError(f"{url!r}: no host name")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ConfigError(f"{url!r}: the port is not a number in 1..65535") from None
        return cls(parts.hostname.lower(), port)

    @property
    def key(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def check_plain_url(url: str, insecure_http: bool) -> None:
    """Refuse an http:// URL that leaves this machine: its token would cross the network
    in the clear (the node refuses plain HTTP from other addresses anyway)."""
    if not url.lower().startswith("http://") or insecure_http:
        return
    where = Endpoint.of(url)
    if is_loopback_host(where.host):
        return
    https = "https://" + url.split("://", 1)[1]
    raise ConfigError(
        f"{url}: refusing plain HTTP to a remote node: the API token would cross the network "
        "in the clear",
        f"use {https} (the node's certificate is pinned on first use: --accept-new), or "
        "--ssh; --insecure-http sends it anyway",
    )


# ---- known_certs --------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    fingerprint: str
    where: str  # path:line


def lookup(path: Path, key: str) -> Known | None:
    """The recorded fingerprint for `key` (the first line that names it)."""
    try:
        raw = read_at_most(path, MAX_KNOWN_CERTS_BYTES)  # a pipe is refused, not waited on
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    if len(raw) > MAX_KNOWN_CERTS_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_KNOWN_CERTS_BYTES} bytes")
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        fields = line.split()
        if len(fields) != 3 or line.lstrip().startswith("#"):
            continue
        name, algorithm, value = fields
        if name.lower() == key and algorithm.lower() == ALGORITHM:
            return Known(value.upper(), f"{path}:{number}")
    return None


def record(path: Path, key: str, fp: str) -> None:
    """Append one line, creating the directory 0700 and the file 0600 when needed."""
    line = f"{key} {ALGORITHM} {fp}\n".encode("ascii")
    with _LOCK:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = regular_size(fd, path)
            if size is None:  # /dev/null: the user keeps no key
                return
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a hand-edited file without a final newline
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- the peer's certificate ---------------------------------------------------------


_CONTEXTS: dict[str | None, ssl.SSLContext] = {}


def _unverified_context() -> ssl.SSLContext:
    """A client context that accepts any chain: only for handshakes whose certificate is
    then held to a fingerprint, or that send nothing."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """The context for requests to nodes: without `ca_file`, one that accepts any chain
    (the certificate is then held to its pin, `matches`); with it, one that verifies the
    chain against that CA and the host name, as a browser does. One of each per process
    (loading a CA file, or the system's store, for every node of a fleet costs more than
    the request). Never the system's CA store: nodes have no public certificates."""
    with _LOCK:
        ctx = _CONTEXTS.get(ca_file)
        if ctx is not None:
            return ctx
        if ca_file is None:
            ctx = _unverified_context()
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, names checked
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                ctx.load_verify_locations(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    f"--ca-file {ca_file}: not a PEM file of CA certificates: "
                    f"{getattr(e, 'reason', None) or e.strerror or e}"
                ) from e
        _CONTEXTS[ca_file] = ctx
        return ctx


def matches(der: bytes | None, pinned: str) -> bool:
    """Whether the certificate (DER) is the pinned one. Colons and case are ignored, as
    a hand-edited known_certs may have neither."""
    want = pinned.replace(":", "").lower()
    return der is not None and hashlib.sha256(der).hexdigest() == want


def presented(where: Endpoint, timeout: float) -> str:
    """The fingerprint of the certificate the node presents now: one handshake with no
    verification (nothing is sent over it), for the first use and for the error that
    shows a changed certificate."""
    ctx = client_context(None)
    url = f"https://{where.key}"
    try:
        with (
            socket.create_connection((where.host, where.port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=sni(where.host)) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except socket.gaierror as e:
        raise TransportError(
            f"cannot resolve {where.host}", "check the node's name or use its address"
        ) from e
    except ConnectionRefusedError as e:
        raise TransportError(
            f"connection refused at {url}", "is the service running? rc-service smechvisord status"
        ) from e
    except TimeoutError as e:
        raise TransportError(
            f"no answer from {url} within {timeout:g} s",
            "check the address and firewall; raise --timeout",
        ) from e
    except ssl.SSLError as e:
        raise TransportError(
            f"TLS failed with {url}: {e.reason or e}",
            "is this smechvisord's port? a node without a certificate serves only its "
            "own loopback: reach it with --ssh",
        ) from e
    except OSError as e:
        raise TransportError(f"cannot reach {url}: {e.strerror or e}") from e
    if not der:
        raise TransportError(f"{url}: the node presented no certificate")
    return fingerprint(der)


def sni(host: str) -> str | None:
    # SNI carries names only, never addresses (RFC 6066).
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return None
    return host


def pin(url: str, timeout: float, accept_new: bool, path: Path | None = None) -> str:
    """The fingerprint to hold the node at `url` to: the recorded one, or (first use, with
    `accept_new`) the one it presents now, recorded. Raises CertificateError (exit 3)."""
    path = path or known_certs_path()
    where = Endpoint.of(url)
    known = lookup(path, where.key)
    if known is not None:
        return known.fingerprint
    fp = presented(where, timeout)
    if not accept_new:
        raise CertificateError(
            f"{url}: unknown TLS certificate for {where.key}: SHA256 {fp}",
            "check it against the node's own (on the node: smechvisord --print-fingerprint, "
            f"or the daemon's start-up log), then re-run with --accept-new to record it in "
            f"{path}; or trust a private CA with --ca-file",
        )
    try:
        record(path, where.key, fp)
    except OSError as e:
        raise CertificateError(
            f"cannot record the certificate of {where.key} in {path}: {e}"
        ) from e
    log.warning("Permanently added %s (SHA256 %s) to %s", where.key, fp, path)
    return fp


def changed_error(
    url: str, timeout: float, path: Path | None = None, now: str | None = None
) -> CertificateError:
    """The refusal for a handshake whose certificate did not match the pinned one; `now`
    is the fingerprint it presented (read again from the node when not given)."""
    path = path or known_certs_path()
    where = Endpoint.of(url)
    known = lookup(path, where.key)
    if now is None:
        try:
            now = presented(where, timeout)
        except TransportError as e:
            now = f"(could not read it again: {e.message})"
    old = known.fingerprint if known else "(no longer recorded)"
    place = known.where if known else str(path)
    return CertificateError(
        f"{url}: the TLS certificate of {where.key} has CHANGED: {place} has SHA256 {old}, "
        f"the node presented SHA256 {now}",
        "someone may be intercepting the connection, or the node's certificate was replaced. "
        "Check on the node (smechvisord --print-fingerprint); if the change is expected, "
        f"delete that line of {path} and re-run with --accept-new. "
        "--accept-new never replaces a known certificate.",
    )
