"""TLS for the API port: the node's certificate (made at first start with the openssl CLI,
or the operator's own), the server context, the fingerprint operators compare, and the
per-connection gate that decides between TLS and plain HTTP.

One port serves both. The gate runs in each connection's worker thread, never in the
accept thread (a client that stalls its handshake must not stall everyone):

- it peeks at the first byte, with a deadline: 0x16 opens a TLS ClientHello, so the
  connection is wrapped and the handshake finished before that same deadline;
- anything else is plain HTTP, served only to a loopback peer (the node's shell, and the
  SSH tunnel, which ends on the node's loopback);
- plain HTTP from any other address gets one fixed 400 that names the https:// URL,
  without reading the request: no bearer token is accepted in the clear from the network.

docs/tls.md explains the choice and the operator's side.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from smechvisord import hostcmd
from smechvisord import protocol as p

log = logging.getLogger(__name__)

TLS_RECORD_HANDSHAKE = 0x16  # the first byte of every TLS ClientHello
# Longest a client may take from connect to a finished handshake (or to its first byte,
# for plain HTTP); capped by the socket timeout setting.
HANDSHAKE_DEADLINE = 10.0
# How long a refused plain-HTTP client gets to finish sending before the close: reading
# what it sent keeps the kernel from answering the close with a reset that destroys the
# 400 before the client reads it.
DRAIN_SECONDS = 1.0
DRAIN_BYTES = 64 * 1024
OPENSSL_TIMEOUT = 60.0
CERT_DAYS = 3650
# A certificate file larger than this is not one (every untrusted read is capped).
MAX_PEM_BYTES = 1 << 20


class CertificateUnavailable(RuntimeError):
    """No usable certificate and key: the message says what is wrong and what to do."""


class Refused(ConnectionError):
    """The connection was not let through the gate (routine: logged at debug level)."""


# ---- the certificate ----------------------------------------------------------------


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as colon-separated upper-case hex: what
    `openssl x509 -fingerprint -sha256` and browsers' certificate viewers show."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def leaf_der(cert_file: Path) -> bytes:
    """The DER of the first certificate in a PEM file (the leaf of a chain)."""
    with cert_file.open("rb") as f:
        data = f.read(MAX_PEM_BYTES + 1)
    if len(data) > MAX_PEM_BYTES:
        raise CertificateUnavailable(f"{cert_file} is larger than {MAX_PEM_BYTES} bytes")
    m = _PEM_CERT.search(data)
    if m is None:
        raise CertificateUnavailable(f"{cert_file} holds no PEM certificate")
    try:
        return ssl.PEM_cert_to_DER_cert(m.group(0).decode("ascii"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CertificateUnavailable(f"{cert_file}: not a PEM certificate: {e}") from e


def local_addresses(proc_net: Path) -> list[str]:
    """This host's unicast addresses, from the kernel's tables (IPv4 LOCAL routes, IPv6
    addresses of global scope); loopback and link-local left out."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        last = ""
        for line in (proc_net / "fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith(("|--", "+--")):
                last = text[3:].strip().split()[0]
            elif text == "/32 host LOCAL" and last:
                found.append(last)
    with contextlib.suppress(OSError):
        for line in (proc_net / "if_inet6").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[3] == "00" and len(fields[0]) == 32:
                raw = fields[0]
                found.append(":".join(raw[i : i + 4] for i in range(0, 32, 4)))
    out: list[str] = []
    for text in found:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            continue
        if addr.is_loopback or addr.is_link_local or addr.is_unspecified:
            continue
        if str(addr) not in out:
            out.append(str(addr))
    return out


def subject_names(hostname: str, bind_host: str, addresses: Iterable[str]) -> list[str]:
    """subjectAltName entries: the host name, localhost, loopback, the bind address when it
    is a specific one, and the host's addresses at first start. Pinning does not need them;
    a browser, or a client verifying against a private CA, checks the name it was given."""
    names = [f"DNS:{n}" for n in dict.fromkeys([hostname, "localhost"]) if _dns_name(n)]
    ips: list[str] = ["127.0.0.1", "::1"]
    for text in [bind_host, *addresses]:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            if text and _dns_name(text) and f"DNS:{text}" not in names:
                names.append(f"DNS:{text}")
            continue
        if not addr.is_unspecified and str(addr) not in ips:
            ips.append(str(addr))
    return names + [f"IP:{a}" for a in ips]


def _dns_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name))


def generate(cert_file: Path, key_file: Path, sans: list[str], openssl: str = "openssl") -> None:
    """A new EC P-256 key (0600) and a self-signed certificate for `sans`, written by the
    openssl CLI into a private temporary directory, then renamed into place (key first:
    the certificate's presence means the pair is complete)."""
    key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    common_name = (sans[0].split(":", 1)[1] if sans else "smechvisord")[:64]
    work = Path(tempfile.mkdtemp(prefix=".tls-", dir=key_file.parent))  # 0700
    try:
        key_tmp, cert_tmp = work / "key.pem", work / "cert.pem"
        argv = [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-sha256",
            "-days",
            str(CERT_DAYS),
            "-subj",
            f"/O=SmechVisor/CN={common_name}",
            "-addext",
            f"subjectAltName={','.join(sans)}",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "keyUsage=critical,digitalSignature",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-keyout",
            str(key_tmp),
            "-out",
            str(cert_tmp),
        ]
        try:
            hostcmd.run_host_command(argv, timeout=OPENSSL_TIMEOUT)
        except hostcmd.HostCommandError as e:
            raise CertificateUnavailable(f"cannot make a certificate: {e}") from e
        os.chmod(key_tmp, 0o600)
        os.chmod(cert_tmp, 0o644)
        os.replace(key_tmp, key_file)
        os.replace(cert_tmp, cert_file)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure(cert_file: Path, key_file: Path, sans: list[str], openssl: str = "openssl") -> bool:
    """Make the pair at first start; True when it was made now. An operator's pair is
    used as it is; half a pair is refused rather than overwritten."""
    have_cert, have_key = cert_file.exists(), key_file.exists()
    if have_cert and have_key:
        mode = key_file.stat().st_mode
        if mode & 0o077:
            # A key others can read is a credential leak: tighten it and say so.
            log.warning("TLS key %s was readable by others; set it to 0600", key_file)
            os.chmod(key_file, 0o600)
        return False
    if have_cert or have_key:
        present, missing = (cert_file, key_file) if have_cert else (key_file, cert_file)
        raise CertificateUnavailable(
            f"{present} exists but {missing} does not: install both, or remove {present} "
            "and restart to get a new self-signed pair"
        )
    generate(cert_file, key_file, sans, openssl)
    return True


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise CertificateUnavailable(
            f"cannot load the certificate {cert_file} with the key {key_file}: {e}"
        ) from e
    return ctx


# ---- the gate -----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


class Gate:
    """Decides, per connection and in its worker thread, between TLS and plain HTTP.

    `context` None means no certificate could be had: loopback clients are served plain,
    every other client is refused (reach the node over SSH until the certificate is fixed).
    """

    def __init__(
        self,
        context: ssl.SSLContext | None,
        deadline: float = HANDSHAKE_DEADLINE,
        fingerprint: str | None = None,
    ) -> None:
        self.context = context
        self.deadline = deadline
        self.fingerprint = fingerprint

    def accept(self, sock: socket.socket, peer: tuple[str, int]) -> socket.socket:
        """The connection to serve HTTP on: `sock` itself (plain, loopback), or its TLS
        wrapper with the handshake done. Raises Refused, with `sock` left for the caller
        to close."""
        started = time.monotonic()
        end = started + self.deadline
        try:
            sock.settimeout(self.deadline)
            first = sock.recv(1, socket.MSG_PEEK)
        except OSError as e:  # TimeoutError included
            raise Refused(f"{peer[0]}: nothing sent within {self.deadline:g} s") from e
        if not first:
            raise Refused(f"{peer[0]}: closed before sending anything")
        if first[0] == TLS_RECORD_HANDSHAKE:
            if self.context is None:
                raise Refused(f"{peer[0]}: TLS requested, but this node has no certificate")
            return self._handshake(sock, peer, end)
        if is_loopback(peer[0]):
            return sock
        self._refuse_plain(sock, end)
        raise Refused(f"{peer[0]}: plain HTTP from a non-loopback address")

    def release(self, conn: socket.socket) -> None:
        """Close a TLS wrapper `accept` returned (the plain socket is the server's to close)."""
        if isinstance(conn, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            conn.close()

    def _handshake(self, sock: socket.socket, peer: tuple[str, int], end: float) -> socket.socket:
        if self.context is None:  # accept() checked; this keeps the type checker informed
            raise Refused(f"{peer[0]}: no certificate")
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise Refused(f"{peer[0]}: TLS handshake not done within {self.deadline:g} s")
            # CPython bounds the whole handshake by the timeout (one deadline across its
            # reads), so a ClientHello dripped a byte at a time is cut off all the same.
            tls.settimeout(remaining)
            tls.do_handshake()
            return tls
        except Refused:
            tls.close()
            raise
        except TimeoutError as e:
            tls.close()
            raise Refused(f"{peer[0]}: TLS handshake not done within {self.deadline:g} s") from e
        except (ssl.SSLError, OSError) as e:
            tls.close()
            # e.g. a browser that does not (yet) trust the certificate: "alert bad certificate".
            reason = getattr(e, "reason", None) or e
            raise Refused(f"{peer[0]}: TLS handshake failed: {reason}") from e

    def _refuse_plain(self, sock: socket.socket, end: float) -> None:
        local = sock.getsockname()
        host = f"[{local[0]}]" if ":" in local[0] else local[0]
        if self.context is None:
            message = (
                "this node serves plain HTTP to its own loopback only, and has no TLS "
                "certificate (see its log): reach it over SSH"
            )
        else:
            message = (
                f"this port speaks HTTPS to other machines: use https://{host}:{local[1]}/ "
                "(plain HTTP is served to the node's own loopback only)"
            )
        body = json.dumps({"error": {"code": p.ERR_TLS_REQUIRED, "message": message}}).encode()
        head = (
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        drain_end = min(end, time.monotonic() + DRAIN_SECONDS)
        try:
            sock.settimeout(max(0.01, drain_end - time.monotonic()))
            sock.sendall(head + body)
            sock.shutdown(socket.SHUT_WR)
            taken = 0
            while taken < DRAIN_BYTES:
                remaining = drain_end - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                chunk = sock.recv(16384)
                if not chunk:
                    break
                taken += len(chunk)
        except OSError:
            pass


def open_gate(
    cert_file: Path,
    key_file: Path,
    sans: list[str],
    deadline: float,
    openssl: str = "openssl",
) -> Gate:
    """The gate for the daemon: with the node's certificate when it can be had (made now
    if missing), else without one (loopback only), the reason logged."""
    try:
        made = ensure(cert_file, key_file, sans, openssl)
        ctx = server_context(cert_file, key_file)
        fp = fingerprint(leaf_der(cert_file))
    except (CertificateUnavailable, OSError) as e:
        log.error(
            "TLS unavailable, serving plain HTTP to loopback clients only (reach the node "
            "over SSH): %s",
            e,
        )
        return Gate(None, deadline)
    if made:
        log.info("made a self-signed TLS certificate %s (key %s, 0600)", cert_file, key_file)
    log.info("TLS certificate %s, SHA-256 fingerprint %s", cert_file, fp)
    return Gate(ctx, deadline, fp)
