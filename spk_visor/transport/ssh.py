"""SSH to a node with paramiko: the API through a tunnel to the node's loopback daemon, and
the node's token read over SFTP, so the SSH login is the only credential an operator needs.

What it honours, as OpenSSH's `ssh` does:

- ``~/.ssh/config`` (then ``/etc/ssh/ssh_config``): HostName, User, Port, IdentityFile,
  IdentitiesOnly. An explicit ``user@`` or ``:port`` (``--ssh``, a config node's ``ssh``)
  wins over the file, as on ssh's command line.
- Keys: the IdentityFiles, then the SSH agent's keys, then (when no IdentityFile is set)
  ``~/.ssh/id_ed25519``, ``id_ecdsa``, ``id_rsa``. No passphrase prompt: an encrypted key
  belongs in the agent.
- Host keys: ``/etc/ssh/ssh_known_hosts`` and ``~/.ssh/known_hosts``. An unknown key is
  refused (HostKeyError, exit 3, with its fingerprint) unless the operator passed
  ``--accept-new``, which appends it to ``~/.ssh/known_hosts``; a changed key is refused
  always (DESIGN.md, Security defaults; EXAMPLES.md B.8).

"~" is ``os.path.expanduser("~")``, i.e. $HOME: tests point it at a temp dir.

Connections are pooled per (user, host, port); see `_Shared` for why and for how
`SshTransport.close` avoids closing a connection another thread still uses.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import errno
import getpass
import hashlib
import http.client
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import paramiko
from paramiko.auth_strategy import AuthFailure, AuthSource, AuthStrategy, SourceResult

from smechvisord.version import VERSION
from spk_visor.capped_read import read_at_most, regular_size
from spk_visor.config import SshSpec, Target, check_token, parse_ssh
from spk_visor.errors import (
    AuthError,
    ConfigError,
    HostKeyError,
    ProtocolError,
    SpkVisorError,
    TransportError,
)
from spk_visor.transport.base import MAX_RESPONSE_BYTES, Response, Transport
from spk_visor.transport.deadline import Deadline, DeadlineSocket

log = logging.getLogger(__name__)
# paramiko logs channel failures ("Secsh channel 3 open FAILED") at ERROR; with no handler
# configured, Python's last-resort handler would print them on the CLI's stderr next to
# our own message. A NullHandler stops that; an application that configures logging
# (e.g. for --verbose) still receives them through the root logger.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

USER_AGENT = f"spk-visor/{VERSION}"
SERVICE_HINT = "is the service running? rc-service smechvisord status"
SSH_PORT = 22
# Where the daemon listens on the node: loopback, so it need not be exposed at all.
NODE_LOOPBACK = "127.0.0.1"
SYSTEM_SSH_CONFIG = Path("/etc/ssh/ssh_config")
SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")  # OpenSSH's order, minus DSA
# The daemon writes a short hex token; anything this large is not one (DESIGN.md: every
# untrusted read is size-capped).
MAX_TOKEN_BYTES = 4096
# RFC 4254 channel-open failure reasons (paramiko.common has them, untyped).
_OPEN_PROHIBITED = 1
_OPEN_CONNECT_FAILED = 2


def _home() -> Path:
    return Path(os.path.expanduser("~"))


def user_known_hosts() -> Path:
    return _home() / ".ssh" / "known_hosts"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's default fingerprint: ``SHA256:`` and unpadded base64 of the key blob."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def describe_key(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {fingerprint(key)}"


# ---- where to connect: ~/.ssh/config ---------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """An SshSpec resolved through the ssh config files."""

    alias: str  # what the operator wrote (a Host alias, or a host name)
    host: str  # what we connect to (HostName)
    port: int
    user: str
    identity_files: tuple[Path, ...]
    identities_only: bool
    # ProxyJump: the last hop before this host (itself reached through its own `jump`).
    jump: Endpoint | None = None

    @property
    def pool_key(self) -> tuple[str, str, int]:
        return (self.user, self.host, self.port)

    @property
    def known_hosts_name(self) -> str:
        # The name OpenSSH (and paramiko's check) uses in known_hosts.
        return self.host if self.port == SSH_PORT else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def _ssh_config() -> tuple[paramiko.SSHConfig, list[Path]]:
    # User file first: for each option the first value found wins, as in OpenSSH.
    cfg = paramiko.SSHConfig()
    read: list[Path] = []
    for path in (_home() / ".ssh" / "config", SYSTEM_SSH_CONFIG):
        try:
            with path.open(encoding="utf-8") as f:
                cfg.parse(f)
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, paramiko.SSHException) as e:
            raise ConfigError(f"cannot use SSH config {path}: {e}") from e
        read.append(path)
    return cfg, read


def resolve_endpoint(spec: SshSpec, *, hop: bool = False) -> Endpoint:
    """Apply ~/.ssh/config to `spec`; ConfigError names the file when it is unusable.
    `hop`: a ProxyJump host, whose own ProxyJump is not followed (a `Host *` ProxyJump
    would otherwise send the bastion through itself)."""
    cfg, read = _ssh_config()
    where = ", ".join(str(p) for p in read) or "~/.ssh/config"
    try:
        found = cfg.lookup(spec.host)
    except Exception as e:  # `Match exec` needs `invoke`, bad tokens, ...: all config faults
        raise ConfigError(f"cannot apply {where} to host {spec.host!r}: {e}") from e
    port_text = found.get("port")
    try:
        port = spec.port or (int(port_text) if port_text else SSH_PORT)
    except ValueError:
        raise ConfigError(f"{where}: Port {port_text!r} for {spec.host} is not a number") from None
    files = tuple(Path(os.path.expanduser(p)) for p in found.get("identityfile", []) or [])
    proxy_command = str(found.get("proxycommand") or "none")
    if proxy_command.lower() != "none":
        # Ignoring it would connect straight to the host, past whatever it goes through.
        raise ConfigError(
            f"{where}: ProxyCommand for {spec.host} is not supported",
            "reach the host through a jump host with ProxyJump [USER@]HOST[:PORT] instead",
        )
    jump: Endpoint | None = None
    jumps = str(found.get("proxyjump") or "none")
    if not hop and jumps.lower() != "none":
        # Hops in order, each reached through the one before (as ssh -J A,B).
        for text in jumps.split(","):
            try:
                hop_spec = parse_ssh(text.strip().removeprefix("ssh://"), "ProxyJump")
            except ConfigError as e:
                raise ConfigError(f"{where}: {e.message} (for {spec.host})") from None
            hop_ep = resolve_endpoint(hop_spec, hop=True)
            jump = dataclasses.replace(hop_ep, jump=jump)
    return Endpoint(
        alias=spec.host,
        host=str(found.get("hostname") or spec.host),
        port=port,
        user=spec.user or str(found.get("user") or getpass.getuser()),
        identity_files=files,
        identities_only=str(found.get("identitiesonly", "no")).lower() == "yes",
        jump=jump,
    )


# ---- host keys -----------------------------------------------------------------------

# Far above any real known_hosts (a line is ~100 bytes), and a bound for a device.
MAX_KNOWN_HOSTS_BYTES = 64 << 20
_KNOWN_HOSTS_LOCK = threading.Lock()  # fleet threads may record keys concurrently


def _known_hosts_files() -> list[Path]:
    return [SYSTEM_KNOWN_HOSTS, user_known_hosts()]


def load_known_hosts(into: paramiko.HostKeys) -> None:
    """Load the system and user known_hosts files, line by line.

    Not paramiko's `HostKeys.load`: a marker line (``@revoked``, ``@cert-authority``)
    makes it raise InvalidHostKey and lose the whole file. Markers are skipped here:
    @revoked is enforced by `revoked_at`; paramiko cannot verify host certificates, so a
    host known only through @cert-authority is "unknown", as with OpenSSH when the CA
    line is missing. Lines paramiko cannot parse (key types it lacks) are skipped too.
    """
    for path in _known_hosts_files():
        try:
            data = read_at_most(path, MAX_KNOWN_HOSTS_BYTES)
            text = data.decode("utf-8")
        except FileNotFoundError:
            continue
        except OSError as e:  # a pipe too: its open would wait for a writer
            raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        if len(data) > MAX_KNOWN_HOSTS_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_KNOWN_HOSTS_BYTES >> 20} MiB")
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith(("#", "@")):
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
            except Exception as e:  # InvalidHostKey (bad base64) is not an SSHException
                log.debug("ssh: %s:%d: skipped: %s", path, number, e)
                continue
            if entry is None:
                continue
            for name in entry.hostnames:
                into.add(name, entry.key.get_name(), entry.key)


def _lines(path: Path) -> list[str]:
    """The lines of a known_hosts file; none when it cannot be read (load_known_hosts
    says why)."""
    try:
        raw = read_at_most(path, MAX_KNOWN_HOSTS_BYTES)
    except OSError:
        return []
    return raw.decode("utf-8", errors="replace").splitlines()


def known_hosts_entries(name: str) -> list[str]:
    """``path:line`` of every known_hosts entry for `name`, hashed entries included."""
    found: list[str] = []
    for path in _known_hosts_files():
        lines = _lines(path)
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith(("#", "@")):
                continue
            for pattern in fields[0].split(","):
                if pattern == name or (
                    pattern.startswith("|1|")
                    and paramiko.HostKeys.hash_host(name, pattern) == pattern
                ):
                    found.append(f"{path}:{number}")
                    break
    return found


def revoked_at(key: paramiko.PKey) -> str | None:
    """``path:line`` of a ``@revoked`` known_hosts entry for this key, if any.

    `load_known_hosts` skips marker lines, so without this a revoked key would look merely
    unknown, and --accept-new would record it; OpenSSH refuses it. Stricter than OpenSSH,
    a revocation counts whatever host pattern the line names.
    """
    blob = key.get_base64()
    for path in _known_hosts_files():
        lines = _lines(path)
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if len(fields) >= 4 and fields[0] == "@revoked" and fields[3] == blob:
                return f"{path}:{number}"
    return None


def _revoked_error(endpoint: Endpoint, key: paramiko.PKey, where: str) -> HostKeyError:
    return HostKeyError(
        f"ssh://{endpoint}: the host key {describe_key(key)} is REVOKED ({where})",
        "someone may be impersonating the node; do not connect until its keys are replaced",
    )


def record_host_key(path: Path, name: str, key: paramiko.PKey) -> None:
    """Append one known_hosts line, creating ~/.ssh 0700 and the file 0600 if needed.

    An append, not paramiko's save_host_keys(): that rewrites the whole file and drops
    comments and lines paramiko cannot parse (keys of types it does not know).
    """
    line = f"{name} {key.get_name()} {key.get_base64()}\n".encode("ascii")
    with _KNOWN_HOSTS_LOCK:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = regular_size(fd, path)
            if size is None:  # /dev/null: the user keeps no key
                return
            if size == 0:
                os.fchmod(fd, 0o600)
            elif os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a hand-edited file without a final newline
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _host_key_file(key: paramiko.PKey) -> str:
    """Where OpenSSH keeps the node's public host key of this type (for the hint)."""
    name = key.get_name()
    kind = "rsa" if "rsa" in name else "ecdsa" if name.startswith("ecdsa") else "ed25519"
    return f"/etc/ssh/ssh_host_{kind}_key.pub"


class AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko only for a host absent from every known_hosts file.

    Without --accept-new it refuses, showing the fingerprint to check; with it, it records
    the key, like OpenSSH's ``StrictHostKeyChecking=accept-new``. Never paramiko's
    auto-add policy: that trusts silently and keeps the key only in memory. A *changed* key
    never reaches here (paramiko raises BadHostKeyException first), so --accept-new cannot
    replace one.
    """

    def __init__(self, endpoint: Endpoint, accept_new: bool) -> None:
        self.endpoint = endpoint
        self.accept_new = accept_new

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        path = user_known_hosts()
        revoked = revoked_at(key)
        if revoked:
            raise _revoked_error(self.endpoint, key, revoked)
        if not self.accept_new:
            raise HostKeyError(
                f"ssh://{self.endpoint}: unknown host key for {hostname}: {describe_key(key)}",
                f"check the fingerprint on the node (ssh-keygen -lf {_host_key_file(key)}), "
                f"then re-run with --accept-new to record it in {path}",
            )
        try:
            record_host_key(path, hostname, key)
        except OSError as e:
            raise HostKeyError(f"cannot record the host key of {hostname} in {path}: {e}") from e
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("Permanently added %s (%s) to %s", hostname, describe_key(key), path)


def _changed_key_error(endpoint: Endpoint, e: paramiko.BadHostKeyException) -> HostKeyError:
    name = endpoint.known_hosts_name
    where = ", ".join(known_hosts_entries(name)) or "known_hosts"
    return HostKeyError(
        f"ssh://{endpoint}: the host key of {name} has CHANGED: known_hosts has "
        f"{describe_key(e.expected_key)}, the server offered {describe_key(e.key)}",
        f"someone may be intercepting the connection, or the node was reinstalled. Check "
        f"{where}; if the change is expected, verify the new key on the node, then remove "
        f"the old entry (ssh-keygen -R '{name}'). --accept-new never replaces a known key.",
    )


# ---- authentication ------------------------------------------------------------------


class _KeyFile(AuthSource):
    """A private key file, loaded only when tried so a bad file is one failed attempt."""

    def __init__(self, username: str, path: Path, origin: str) -> None:
        super().__init__(username)
        self.path = path
        self.origin = origin

    def __str__(self) -> str:
        return f"{self.path} ({self.origin})"

    def authenticate(self, transport: paramiko.Transport) -> list[str]:
        try:
            key = paramiko.PKey.from_path(self.path)
        except TypeError as e:
            # An encrypted key in OpenSSH's format reaches cryptography, which says
            # "password-protected" with a TypeError, not paramiko's exception.
            raise paramiko.PasswordRequiredException(str(e)) from e
        return transport.auth_publickey(self.username, key)


class _AgentKey(AuthSource):
    def __init__(self, username: str, key: paramiko.AgentKey) -> None:
        super().__init__(username)
        self.key = key

    def __str__(self) -> str:
        return f"ssh-agent key {describe_key(self.key)}"

    def authenticate(self, transport: paramiko.Transport) -> list[str]:
        return transport.auth_publickey(self.username, self.key)


class _KeyStrategy(AuthStrategy):
    """OpenSSH's public-key order, and a record of what was tried for the error message.

    paramiko's built-in `SSHClient._auth` is not used: it raises on a missing
    IdentityFile and, with an RSA key, can end with a key-parsing error instead of the
    authentication failure, so the operator would not learn what was tried.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(ssh_config=paramiko.SSHConfig())
        self.endpoint = endpoint
        self.agent: paramiko.Agent | None = None
        self.notes: list[str] = []

    def get_sources(self) -> Iterator[AuthSource]:
        ep = self.endpoint
        for path in ep.identity_files:
            yield _KeyFile(ep.user, path, "IdentityFile")
        if ep.identities_only:
            self.notes.append("ssh-agent: not used (IdentitiesOnly yes)")
        elif not os.environ.get("SSH_AUTH_SOCK"):
            self.notes.append("ssh-agent: none (SSH_AUTH_SOCK is not set)")
        else:
            try:
                self.agent = paramiko.Agent()
                keys = self.agent.get_keys()
            except (paramiko.SSHException, OSError) as e:
                self.notes.append(f"ssh-agent: unusable ({e})")
                keys = ()
            if not keys:
                self.notes.append("ssh-agent: no keys (or not reachable at SSH_AUTH_SOCK)")
            for key in keys:
                yield _AgentKey(ep.user, key)
        if not ep.identity_files:
            defaults = [_home() / ".ssh" / name for name in DEFAULT_IDENTITIES]
            present = [p for p in defaults if p.exists()]
            if not present:
                self.notes.append(f"no default key in {_home() / '.ssh'} (id_ed25519, ...)")
            for path in present:
                yield _KeyFile(ep.user, path, "default")

    def authenticate(self, transport: paramiko.Transport) -> list[SourceResult]:
        # paramiko calls this once the host key passed its check, before any key is
        # offered: the place to refuse a known key that is also listed as @revoked.
        server_key = transport.get_remote_server_key()
        revoked = revoked_at(server_key)
        if revoked:
            raise _revoked_error(self.endpoint, server_key, revoked)
        return super().authenticate(transport)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()


def _attempt_outcome(result: object) -> str:
    if isinstance(result, paramiko.BadAuthenticationType):
        return f"the server accepts only {', '.join(result.allowed_types) or 'nothing'}"
    if isinstance(result, paramiko.PasswordRequiredException):
        return "encrypted; load it into ssh-agent (ssh-add)"
    if isinstance(result, FileNotFoundError):
        return "no such file"
    if isinstance(result, paramiko.AuthenticationException):
        return "refused"
    if isinstance(result, Exception):
        return f"{type(result).__name__}: {result}"
    return "refused"


def _auth_error(
    endpoint: Endpoint, e: paramiko.AuthenticationException, strategy: _KeyStrategy
) -> AuthError:
    tried = (
        [f"{r.source} -> {_attempt_outcome(r.result)}" for r in e.result]
        if isinstance(e, AuthFailure)
        else [f"{type(e).__name__}: {e}"]
    )
    what = "; ".join(tried + strategy.notes) or "no key to offer"
    return AuthError(
        f"SSH login refused for {endpoint} (public key); tried: {what}",
        f"check the user and that the key's public half is in {endpoint.user}'s "
        "authorized_keys on the node; set User and IdentityFile for the host in "
        "~/.ssh/config, load the key into ssh-agent, or use --ssh USER@HOST",
    )


# ---- connecting ----------------------------------------------------------------------


def _connect_error(
    e: BaseException, ep: Endpoint, timeout: float, remote_version: str
) -> SpkVisorError:
    """Translate what paramiko and the socket layer raise into our error tree.

    `remote_version` is the server's SSH banner, "" when none arrived.
    """
    if isinstance(e, socket.gaierror):
        via = f" (HostName for {ep.alias} in ~/.ssh/config)" if ep.alias != ep.host else ""
        return TransportError(
            f"cannot resolve {ep.host}{via}: {e.strerror or e}",
            "check the node's name, or use its address",
        )
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        codes = {getattr(x, "errno", None) for x in e.errors.values()}
        if codes == {errno.ECONNREFUSED}:
            return TransportError(
                f"connection refused at ssh://{ep}",
                "is sshd running on the node, and is the port right "
                "(Port in ~/.ssh/config, or --ssh HOST:PORT)?",
            )
        return TransportError(f"cannot reach ssh://{ep}: host unreachable", "check the network")
    if isinstance(e, TimeoutError):
        return TransportError(
            f"no answer from ssh://{ep} within {timeout:g} s",
            "check the address and firewall; raise --timeout",
        )
    if isinstance(e, paramiko.BadHostKeyException):
        return _changed_key_error(ep, e)
    if isinstance(e, paramiko.SSHException) and not remote_version:
        # paramiko reports a silent port as "No existing session" or a banner error.
        return TransportError(
            f"no SSH server answered at ssh://{ep} within {timeout:g} s",
            "is that port sshd's? check the address and port; raise --timeout",
        )
    if isinstance(e, paramiko.SSHException):
        return TransportError(f"SSH to {ep} failed: {e}")
    if isinstance(e, OSError):
        return TransportError(f"cannot reach ssh://{ep}: {e.strerror or e}")
    return TransportError(f"SSH to {ep} failed: {type(e).__name__}: {e}")


# Ciphers moved to the front of paramiko's preference list when the server offers them
# (design/ota.md, "Pushing fast over SSH"): paramiko drives the crypto packet by packet,
# and with AES-GCM one AEAD call replaces AES-CTR plus a separate HMAC over the packet.
# Measured here on loopback (bench/ota_push.py), bulk uploads ran 1.5-2.4x faster with
# aes128-gcm than with paramiko's default, aes128-ctr + hmac-sha2-256.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _tuned_transport(sock: Any, /, **kwargs: Any) -> paramiko.Transport:
    """A Transport for SSHClient.connect (its `transport_factory`), tuned for streaming.

    TCP_NODELAY: paramiko writes each SSH packet with its own send(); with Nagle on, a
    small write that follows another unacknowledged one waits for the peer's delayed ACK.
    Measured here: a request sent as two small writes, then its answer, took 42 ms per
    round with Nagle and 0.7 ms without. (Bulk uploads gain nothing measurable from it.)
    """
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    offered = list(options.ciphers)
    fast = [name for name in FAST_CIPHERS if name in offered]
    options.ciphers = fast + [name for name in offered if name not in fast]
    return transport


def _through_jump(ep: Endpoint, timeout: float, accept_new: bool) -> tuple[Any, Any]:
    """(jump client, channel to ep's SSH port) when ep has a ProxyJump, else (None, None).
    The node is never tried directly: a failing jump host is the error."""
    if ep.jump is None:
        return None, None
    jump_client = _open_client(ep.jump, timeout, accept_new)
    try:
        transport = jump_client.get_transport()
        assert transport is not None  # noqa: S101 (connected just above)
        channel = transport.open_channel(
            "direct-tcpip", (ep.host, ep.port), ("127.0.0.1", 0), timeout=timeout
        )
    except Exception as e:
        jump_client.close()
        raise TransportError(
            f"cannot reach {ep.host}:{ep.port} through the jump host {ep.jump}: {e}",
            "check ProxyJump in ~/.ssh/config, and that the jump host may forward to the node",
        ) from e
    return jump_client, channel


def _open_client(ep: Endpoint, timeout: float, accept_new: bool) -> paramiko.SSHClient:
    jump_client, channel = _through_jump(ep, timeout, accept_new)
    client = paramiko.SSHClient()
    if jump_client is not None:
        # The node's connection lives inside the jump host's: close both together.
        close_node = client.close

        def close_both() -> None:
            close_node()
            jump_client.close()

        client.close = close_both  # type: ignore[method-assign]
    # Both files are loaded into the client's in-memory set, which paramiko checks but,
    # with no load_host_keys() filename, never writes back: new keys are appended by
    # AcceptNewPolicy, keeping the user's file as it is.
    load_known_hosts(client.get_host_keys())
    client.set_missing_host_key_policy(AcceptNewPolicy(ep, accept_new))
    strategy = _KeyStrategy(ep)
    try:
        client.connect(
            ep.host,
            port=ep.port,
            username=ep.user,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            auth_strategy=strategy,
            transport_factory=_tuned_transport,
            sock=channel,
        )
    except SpkVisorError:  # AcceptNewPolicy's refusal, already in our terms
        client.close()
        raise
    except paramiko.AuthenticationException as e:
        client.close()
        raise _auth_error(ep, e, strategy) from e
    except Exception as e:
        t = client.get_transport()
        banner = t.remote_version if t is not None else ""
        client.close()
        raise _connect_error(e, ep, timeout, banner) from e
    except BaseException:  # Ctrl-C: do not leave the transport thread behind
        client.close()
        raise
    finally:
        strategy.close()
    log.debug("ssh: connected to %s", ep)
    return client


# ---- the connection pool -------------------------------------------------------------


class _Shared:
    """One SSH connection, shared by every SshTransport to the same (user, host, port).

    A fleet run, or several transports in one process, then costs one handshake per node
    (paramiko runs many channels over one connection, from any thread).

    The choice: reference counting *and* keeping idle connections until exit.
    `users` counts the transports holding the connection; `SshTransport.close()` only
    decrements it, so it can never close a connection another thread is using. An idle
    connection (users == 0) stays pooled, so the next transport to that node reuses it
    (fleet nodes that share an SSH host, a caller opening clients one after another);
    `close_all()` closes every pooled connection and runs at interpreter exit (atexit).
    A pooled connection the node has since dropped is noticed on the next acquire and
    replaced. A connection is closed at once when it is evicted with no users left.
    """

    def __init__(self, key: tuple[str, str, int], client: paramiko.SSHClient) -> None:
        self.key = key
        self.client = client
        self.users = 0
        self.pooled = True


_pool: dict[tuple[str, str, int], _Shared] = {}
_pool_lock = threading.Lock()  # guards _pool, _connect_locks and every _Shared's counters
# One connection attempt at a time per node: concurrent fleet workers for the same node
# wait for it and share it instead of each opening their own.
_connect_locks: dict[tuple[str, str, int], threading.Lock] = {}


def _alive(client: paramiko.SSHClient) -> bool:
    t = client.get_transport()
    return t is not None and t.is_active()


def _acquire(ep: Endpoint, timeout: float, accept_new: bool) -> _Shared:
    with _pool_lock:
        node_lock = _connect_locks.setdefault(ep.pool_key, threading.Lock())
    with node_lock:
        with _pool_lock:
            shared = _pool.get(ep.pool_key)
            if shared is not None and _alive(shared.client):
                shared.users += 1
                log.debug("ssh: reusing the connection to %s", ep)
                return shared
        if shared is not None:
            _evict(shared)
        client = _open_client(ep, timeout, accept_new)
        fresh = _Shared(ep.pool_key, client)
        with _pool_lock:
            fresh.users = 1
            _pool[ep.pool_key] = fresh
        return fresh


def _release(shared: _Shared) -> None:
    with _pool_lock:
        shared.users -= 1
        close_now = shared.users <= 0 and not shared.pooled
    if close_now:
        shared.client.close()


def _evict(shared: _Shared) -> None:
    """Take a (dead) connection out of the pool; close it if nobody holds it."""
    with _pool_lock:
        if _pool.get(shared.key) is shared:
            del _pool[shared.key]
        shared.pooled = False
        close_now = shared.users <= 0
    if close_now:
        shared.client.close()


def close_all() -> None:
    """Close every pooled SSH connection, in use or not: for interpreter exit and tests."""
    with _pool_lock:
        victims = list(_pool.values())
        _pool.clear()
        for shared in victims:
            shared.pooled = False
    for shared in victims:
        shared.client.close()


atexit.register(close_all)


# ---- exec sessions (spk_visor/transport/ssh_stream.py) ---------------------------------


@contextmanager
def session(
    spec: SshSpec, timeout: float, accept_new: bool
) -> Iterator[tuple[Endpoint, paramiko.Channel]]:
    """A new session channel (for one exec) on the pooled connection to `spec`'s node.

    Connection failures come out as this module's errors (HostKeyError exit 3, AuthError,
    TransportError exit 7). The channel is closed and the connection released on exit.
    """
    ep = resolve_endpoint(spec)
    for attempt in (1, 2):
        shared = _acquire(ep, timeout, accept_new)
        try:
            transport = shared.client.get_transport()
            try:
                if transport is None:  # closed by close_all() in between
                    raise paramiko.SSHException("the connection was closed")
                channel = transport.open_session(timeout=timeout)
            except paramiko.ChannelException as e:
                raise TransportError(
                    f"ssh://{ep}: the node refused a session: {e.text}",
                    "check MaxSessions in the node's sshd_config",
                ) from e
            except (paramiko.SSHException, OSError, EOFError) as e:
                if attempt == 1 and (transport is None or not transport.is_active()):
                    _evict(shared)  # an idle pooled connection the node closed: reconnect
                    continue
                raise TransportError(f"ssh://{ep}: cannot open a session: {e}") from e
            try:
                yield ep, channel
            finally:
                channel.close()
            return
        finally:
            _release(shared)
    raise TransportError(f"ssh://{ep}: the SSH connection closed while in use")


# ---- the transport -------------------------------------------------------------------


class _ChannelStream:
    """An SSH channel as DeadlineSocket reads it: recv_into on top of recv."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel

    def settimeout(self, value: float | None, /) -> None:
        self.channel.settimeout(value)

    def sendall(self, data: bytes, /) -> None:
        self.channel.sendall(data)

    def recv_into(self, buffer: memoryview, /) -> int:
        data = self.channel.recv(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def fileno(self) -> int:
        return self.channel.fileno()

    def close(self) -> None:
        self.channel.close()


class _ChannelHTTPConnection(http.client.HTTPConnection):
    """http.client over an already open SSH channel, every read and send held to the
    request's deadline (transport/deadline.py), as over HTTP."""

    def __init__(self, channel: paramiko.Channel, port: int, deadline: Deadline) -> None:
        super().__init__(NODE_LOOPBACK, port)
        self._channel = channel
        self._deadline = deadline

    def connect(self) -> None:
        # http.client only needs sendall(), makefile("rb") and close().
        self.sock = cast(
            socket.socket, DeadlineSocket(_ChannelStream(self._channel), self._deadline)
        )


class SshTransport(Transport):
    """The daemon's API through SSH: a direct-tcpip channel per request to
    127.0.0.1:<daemon_port> on the node, over a pooled connection."""

    def __init__(self, target: Target, timeout: float, accept_new: bool = False) -> None:
        if target.ssh is None:
            raise ValueError("SshTransport needs a target with an ssh spec")
        self.target = target
        self.timeout = timeout
        self.accept_new = accept_new
        self.endpoint = resolve_endpoint(target.ssh)
        self.address = f"ssh://{self.endpoint}"
        self._shared: _Shared | None = None
        self._lock = threading.Lock()

    def _client(self) -> paramiko.SSHClient:
        """The pooled connection, connecting on first use (or after the node dropped it)."""
        with self._lock:
            if self._shared is not None and not _alive(self._shared.client):
                _evict(self._shared)
                _release(self._shared)
                self._shared = None
            if self._shared is None:
                self._shared = _acquire(self.endpoint, self.timeout, self.accept_new)
            return self._shared.client

    def _open_tunnel(self, wait: float) -> paramiko.Channel:
        port = self.target.daemon_port
        for attempt in (1, 2):
            transport = self._client().get_transport()
            if transport is None:  # closed by close_all() in between
                continue
            try:
                channel = transport.open_channel(
                    "direct-tcpip",
                    dest_addr=(NODE_LOOPBACK, port),
                    src_addr=(NODE_LOOPBACK, 0),
                    timeout=wait,
                )
            except paramiko.ChannelException as e:
                if e.code == _OPEN_CONNECT_FAILED:
                    raise TransportError(
                        f"connection refused at {NODE_LOOPBACK}:{port} on {self.endpoint.host} "
                        "(through SSH)",
                        SERVICE_HINT,
                    ) from e
                if e.code == _OPEN_PROHIBITED:
                    raise TransportError(
                        f"{self.address}: the node's sshd does not allow forwarding to "
                        f"{NODE_LOOPBACK}:{port}",
                        "set AllowTcpForwarding yes (or local) in the node's sshd_config",
                    ) from e
                raise TransportError(
                    f"{self.address}: cannot open a tunnel to {NODE_LOOPBACK}:{port}: {e.text}"
                ) from e
            except paramiko.SSHException as e:
                if attempt == 1 and not transport.is_active():
                    continue  # an idle pooled connection the node closed: reconnect once
                raise TransportError(
                    f"{self.address}: cannot open a tunnel to {NODE_LOOPBACK}:{port}: {e}"
                ) from e
            channel.settimeout(wait)
            return channel
        raise TransportError(f"{self.address}: the SSH connection closed while in use")

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float | None,
    ) -> Response:
        deadline = Deadline(timeout or self.timeout)
        wait = deadline.seconds
        port = self.target.daemon_port
        channel = self._open_tunnel(wait)
        conn = _ChannelHTTPConnection(channel, port, deadline)
        # One request per channel: channels are cheap and this keeps framing trivial.
        sent = {"User-Agent": USER_AGENT, **headers, "Connection": "close"}
        try:
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            if resp.length is not None and resp.length > MAX_RESPONSE_BYTES:
                raise ProtocolError(
                    f"{self.address}{path}: answer of {resp.length} bytes is larger than "
                    f"{MAX_RESPONSE_BYTES}; not smechvisord?"
                )
            data = resp.read(MAX_RESPONSE_BYTES + 1)
            if len(data) > MAX_RESPONSE_BYTES:
                raise ProtocolError(
                    f"{self.address}{path}: answer larger than {MAX_RESPONSE_BYTES} bytes; "
                    "not smechvisord?"
                )
            if resp.length:  # what is left of a Content-Length that never came
                raise TransportError(
                    f"{self.address}: the daemon's answer through SSH broke off: "
                    f"{len(data)} bytes of {len(data) + resp.length} received"
                )
            return Response(resp.status, resp.getheader("Content-Type", ""), data)
        except TimeoutError as e:
            raise TransportError(
                f"no answer from {NODE_LOOPBACK}:{port} on {self.endpoint.host} (through SSH) "
                f"within {wait:g} s",
                "the node may be overloaded; raise --timeout",
            ) from e
        except (http.client.HTTPException, OSError, paramiko.SSHException, EOFError) as e:
            raise TransportError(
                f"{self.address}: the daemon's answer through SSH broke off: "
                f"{type(e).__name__}: {e}"
            ) from e
        finally:
            conn.close()
            # Now, not when the answer's file is collected (DeadlineSocket defers its
            # close while that file is open).
            channel.close()

    def read_remote_token(self, path: str) -> str | None:
        """The node's API token, read over SFTP; None when the file does not exist.

        Trusts the node to hold its own token (the SSH host key authenticated it); the read
        is capped all the same.
        """
        try:
            return self._read_remote_token(path)
        except SpkVisorError:
            raise
        except Exception as e:  # callers see only SpkVisorError, as with request()
            raise TransportError(
                f"{self.address}: cannot read {path} over SFTP: {type(e).__name__}: {e}"
            ) from e

    def _read_remote_token(self, path: str) -> str | None:
        client = self._client()
        try:
            sftp = client.open_sftp()
        except paramiko.SSHException as e:
            raise TransportError(
                f"{self.address}: cannot start SFTP to read the node's token {path}: {e}",
                "enable the sftp subsystem in the node's sshd_config, or pass --token",
            ) from e
        try:
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(self.timeout)
            with sftp.open(path, "rb") as f:
                data = f.read(MAX_TOKEN_BYTES + 1)
        except PermissionError as e:
            raise AuthError(
                f"{self.address}: cannot read the node's token {path}: permission denied "
                f"for SSH user {self.endpoint.user}",
                "join the node's token group (as root on the node: usermod -aG smechvisor "
                f"{self.endpoint.user}; the group is the daemon's SMECHVISORD_TOKEN_GROUP), "
                "log in as root, or pass --token / SPK_VISOR_TOKEN",
            ) from e
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            if isinstance(e, TimeoutError):
                raise TransportError(
                    f"{self.address}: no SFTP answer within {self.timeout:g} s reading {path}",
                    "raise --timeout",
                ) from e
            raise TransportError(
                f"{self.address}: cannot read the node's token {path}: {e.strerror or e}"
            ) from e
        finally:
            sftp.close()
        if len(data) > MAX_TOKEN_BYTES:
            raise ProtocolError(
                f"{self.address}: {path} is larger than {MAX_TOKEN_BYTES} bytes; not a token"
            )
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.address}: {path} is not a token (not ASCII)") from None
        return check_token(text, f"{path} on {self.endpoint.host}") or None

    def close(self) -> None:
        with self._lock:
            shared, self._shared = self._shared, None
        if shared is not None:
            _release(shared)
