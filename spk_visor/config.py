"""Where spk-visor talks to, and with what: flag, then environment, then config file,
then defaults.

The config file (``~/.config/spk-visor/config.toml``, or ``$SPK_VISOR_CONFIG``)::

    [defaults]
    timeout = 10

    [nodes.alpha]
    url = "https://alpha.example:8080"
    token_file = "~/.config/spk-visor/alpha.token"

    [nodes.beta]
    ssh = "admin@beta.example:22"      # token read from the node over SFTP

    [groups]
    rack1 = ["alpha", "beta"]

An Ansible inventory can stand in for [nodes] and [groups] (`--inventory FILE`,
`$SPK_VISOR_INVENTORY`, or `inventory = "..."` under [defaults]): its hosts are reached
over SSH (ansible_host, ansible_port, ansible_user). A --inventory named on the command
line or in the environment is the only source of groups; one set under [defaults] is
looked in after the file's own [groups].
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from spk_visor.capped_read import read_at_most
from spk_visor.errors import ConfigError, register_secret

if TYPE_CHECKING:
    from spk_visor.ansible_inventory import Inventory, InventoryHost

LOCAL_URL = "http://127.0.0.1:8080"
NODE_TOKEN_FILE = "/etc/smechvisord/token"  # noqa: S105 (a path, not a secret)
DEFAULT_DAEMON_PORT = 8080
DEFAULT_TIMEOUT = 10.0
# A day: past it the socket layer cannot represent the deadline (1e11 s raised
# "timestamp out of range" from inside the request), and no answer is worth waiting for.
MAX_TIMEOUT = 86400.0
# Nodes queried at once by --fleet: enough to hide latency across racks, few enough not to
# hammer a jump host or run out of file descriptors. A node that hangs stops counting
# against it after half a second, or less once others have answered (connection.SLOW_*).
DEFAULT_PARALLEL = 64
MAX_PARALLEL = 512
MAX_CONFIG_BYTES = 1 << 20
# What a token file is read up to: more than any token (MAX_TOKEN_CHARS) with blanks.
MAX_TOKEN_FILE_BYTES = 4096
NODE_KEYS = {"url", "ssh", "token_file", "daemon_port", "remote_token_file", "remote_command"}
# The variable behind each global option. They are read here, in resolve(), and nowhere
# else (not by Typer): one precedence (flag > env > file > default), one set of messages.
OPTION_ENV = {
    "node": "SPK_VISOR_NODE",
    "ssh": "SPK_VISOR_SSH",
    "daemon_port": "SPK_VISOR_DAEMON_PORT",
    "fleet": "SPK_VISOR_FLEET",
    "inventory": "SPK_VISOR_INVENTORY",
    "parallel": "SPK_VISOR_PARALLEL",
    "token": "SPK_VISOR_TOKEN",
    "timeout": "SPK_VISOR_TIMEOUT",
    "ca_file": "SPK_VISOR_CA_FILE",
}


def env_help(option: str) -> str:
    """What --help adds to an option read from the environment too."""
    return f"[env var: {OPTION_ENV[option]}]"


# Patterns are compiled on first use (re caches them), not at import: start-up time.
SSH_PATTERN = r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s]+)(?::(?P<port>\d+))?$"


@dataclass(frozen=True)
class SshSpec:
    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{self.host}{port}"


@dataclass(frozen=True)
class Target:
    """One node and how to reach it."""

    name: str
    url: str | None = None  # HTTP(S) base URL of the daemon
    ssh: SshSpec | None = None  # or: SSH to the node, then its loopback daemon
    daemon_port: int = DEFAULT_DAEMON_PORT
    token: str | None = None
    # Where the token was looked for, in order: the error for a missing or wrong token
    # names them.
    token_sources: tuple[str, ...] = ()
    token_file: str | None = None  # a local file
    remote_token_file: str = NODE_TOKEN_FILE  # on the node, read over SFTP
    remote_command: str | None = None  # spk-visor on the node, for `ota push` over SSH

    @property
    def address(self) -> str:
        return f"ssh://{self.ssh}" if self.ssh else str(self.url)


@dataclass(frozen=True)
class Settings:
    """What the CLI's global options resolve to."""

    targets: tuple[Target, ...]
    fleet: str | None
    timeout: float
    accept_new: bool
    config_path: Path | None
    # https nodes: verify against this CA instead of pinning each node's certificate.
    ca_file: str | None = None
    # http:// to a non-loopback node: sent anyway (the token crosses the network in clear).
    insecure_http: bool = False
    inventory_path: Path | None = None
    parallel: int = DEFAULT_PARALLEL


def config_path(environ: dict[str, str] | os._Environ[str]) -> Path:
    explicit = environ.get("SPK_VISOR_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "spk-visor" / "config.toml"


def load_file(path: Path) -> dict[str, Any]:
    """The parsed config file, {} when it does not exist; ConfigError names file and line."""
    try:
        raw = read_at_most(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    # Only when there is a file: tomllib compiles its patterns at import (start-up time).
    import tomllib  # noqa: PLC0415

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    except tomllib.TOMLDecodeError as e:
        # tomllib says "... (at line 3, column 7)": keep it, it is what the user needs.
        raise ConfigError(
            f"{path}: invalid TOML: {e}", "fix the line named above, or move the file away"
        ) from e
    _check_shape(path, raw.decode("utf-8"), data)
    return data


# Enough TOML to find where a key is written: a [table] or [[array]] header, or a
# `key =` / `dotted.key =` line (tomllib gives no positions for valid files).
_HEADER_PATTERN = r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$"
_KEY_PATTERN = (
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
    r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)
_PART_PATTERN = r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'"""


def _key_path(text: str) -> tuple[str, ...]:
    return tuple(part.strip("\"'") for part in re.findall(_PART_PATTERN, text))


def _line_of(text: str, keys: tuple[str, ...]) -> int | None:
    """The line that defines `keys` (a header or an assignment), else the first line of
    something inside it; None when neither is written out (an inline table's key)."""
    table: tuple[str, ...] = ()
    inside: int | None = None
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(_HEADER_PATTERN, line)
        if header:
            table = _key_path(header.group(1))
            found = table
        else:
            key = re.match(_KEY_PATTERN, line)
            if not key:
                continue
            found = table + _key_path(key.group(1))
        if found == keys:
            return number
        if inside is None and found[: len(keys)] == keys:
            inside = number
    return inside


def _where(path: Path, text: str, *keys: str) -> str:
    """`path:line` for the most precise of `keys`, `keys[:-1]`, ... that is written out."""
    for size in range(len(keys), 0, -1):
        line = _line_of(text, keys[:size])
        if line:
            return f"{path}:{line}"
    return str(path)


def _check_shape(path: Path, text: str, data: dict[str, Any]) -> None:
    for key in data:
        if key not in ("defaults", "nodes", "groups"):
            raise ConfigError(
                f"{_where(path, text, key)}: unknown section {key!r}; "
                "expected defaults, nodes, groups"
            )
    nodes = data.get("nodes", {})
    if not isinstance(nodes, dict):
        raise ConfigError(f"{_where(path, text, 'nodes')}: [nodes] must be a table")
    for name, node in nodes.items():
        # Where a key is written is only worked out for an error: finding it scans the whole
        # file, and doing that for every node of a thousand-node fleet took seconds.
        if not isinstance(node, dict):
            raise ConfigError(f"{_where(path, text, 'nodes', name)}: nodes.{name} must be a table")
        unknown = set(node) - NODE_KEYS
        if unknown:
            bad = sorted(unknown)[0]
            raise ConfigError(
                f"{_where(path, text, 'nodes', name, bad)}: nodes.{name}: unknown key {bad!r}; "
                f"expected {', '.join(sorted(NODE_KEYS))}"
            )
        if ("url" in node) == ("ssh" in node):
            raise ConfigError(
                f"{_where(path, text, 'nodes', name)}: nodes.{name} needs exactly one of url or ssh"
            )
        for key in ("url", "ssh", "token_file", "remote_token_file", "remote_command"):
            if key in node and not isinstance(node[key], str):
                raise ConfigError(
                    f"{_where(path, text, 'nodes', name, key)}: nodes.{name}.{key} must be a string"
                )
        if "daemon_port" in node and (
            isinstance(node["daemon_port"], bool) or not isinstance(node["daemon_port"], int)
        ):
            raise ConfigError(
                f"{_where(path, text, 'nodes', name, 'daemon_port')}: "
                f"nodes.{name}.daemon_port must be an integer"
            )
        if "daemon_port" in node and not 0 < node["daemon_port"] < 65536:
            raise ConfigError(
                f"{_where(path, text, 'nodes', name, 'daemon_port')}: "
                f"nodes.{name}.daemon_port must be a port number in 1..65535"
            )
        if "daemon_port" in node and "url" in node:
            # Over HTTP(S) the port is the URL's; this one would be ignored without a word.
            raise ConfigError(
                f"{_where(path, text, 'nodes', name, 'daemon_port')}: "
                f"nodes.{name}.daemon_port goes with ssh",
                f"put the port in nodes.{name}.url instead",
            )
    groups = data.get("groups", {})
    if not isinstance(groups, dict):
        raise ConfigError(f"{_where(path, text, 'groups')}: [groups] must be a table")
    for name, members in groups.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(
                f"{_where(path, text, 'groups', name)}: groups.{name} must be a list of node names"
            )
        if not members:
            raise ConfigError(
                f"{_where(path, text, 'groups', name)}: groups.{name} has no nodes",
                "list its nodes, or remove the group",
            )
        for member in members:
            if members.count(member) > 1:
                raise ConfigError(
                    f"{_where(path, text, 'groups', name)}: groups.{name} names {member!r} twice"
                )
            if member not in nodes:
                raise ConfigError(
                    f"{_where(path, text, 'groups', name)}: groups.{name} names {member!r}, "
                    "which is not under [nodes]"
                )
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{_where(path, text, 'defaults')}: [defaults] must be a table")
    for key, value in defaults.items():
        if key == "parallel":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{_where(path, text, 'defaults', key)}: defaults.parallel must be a "
                    "positive whole number"
                )
            continue
        if key == "inventory":
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"{_where(path, text, 'defaults', key)}: defaults.inventory must be a path"
                )
            continue
        if key != "timeout":
            raise ConfigError(
                f"{_where(path, text, 'defaults', key)}: defaults.{key}: unknown key; "
                "expected timeout, parallel, inventory"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value <= MAX_TIMEOUT
        ):
            raise ConfigError(
                f"{_where(path, text, 'defaults', key)}: defaults.timeout must be a positive "
                f"number, at most {MAX_TIMEOUT:g}"
            )


def parse_ssh(value: str, what: str = "--ssh") -> SshSpec:
    m = re.match(SSH_PATTERN, value.strip())
    if not m:
        raise ConfigError(
            f"{what} {value!r}: expected [user@]host[:ssh_port]",
            "the :PORT is the SSH server's; name the daemon's port with --daemon-port",
        )
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{what} {value!r}: SSH port out of range 1..65535")
    return SshSpec(host=m.group("host").strip("[]"), user=m.group("user"), port=port)


def _check_url(url: str, what: str) -> str:
    if not re.match(r"^https?://[^/\s]+", url, re.IGNORECASE):
        raise ConfigError(f"{what} {url!r}: expected http://HOST[:PORT] or https://...")
    # Schemes are case-insensitive (RFC 3986, 3.1): HTTP:// is http://, in the lower case
    # every later check compares against.
    scheme, rest = url.split("://", 1)
    url = f"{scheme.lower()}://{rest}"
    # Checked here, where the user's words are at hand: urlsplit raises ValueError on a
    # broken [IPv6] host or port, which would otherwise surface later as an internal error.
    shown = repr(url) if "@" not in url else "(a URL with credentials)"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as e:
        raise ConfigError(
            f"{what} {shown}: not a URL ({e}); expected http://HOST[:PORT] or https://..."
        ) from None
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"{what} {shown}: the port is not a number in 1..65535")
    if parts.username is not None or parts.password is not None:
        # requests would send these as Basic auth in place of the API token.
        raise ConfigError(
            f"{what}: a user name or password in the URL is not used by smechvisord",
            "drop USER:PASSWORD@ from the URL; the API token goes in --token or SPK_VISOR_TOKEN",
        )
    if not host:
        raise ConfigError(f"{what} {shown}: no host name; expected http://HOST[:PORT]")
    return url.rstrip("/")


# What an HTTP bearer token can hold: visible ASCII, no spaces (RFC 6750's b64token is
# stricter still). The daemon writes hex.
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
# The daemon's are 43; anything this long is some other file.
MAX_TOKEN_CHARS = 1024


def check_token(token: str, source: str) -> str:
    """`token` without surrounding blanks, remembered as a secret to hide in messages.

    Raises:
        ConfigError: it has spaces, control or non-ASCII characters inside; the message
            names `source` and never repeats the token.
    """
    token = token.strip()
    if len(token) > MAX_TOKEN_CHARS:
        # A wrong file (a log, an image) would go out as a header the daemon refuses.
        raise ConfigError(
            f"the API token from {source} is not a token: {len(token)} characters",
            "copy it again from /etc/smechvisord/token on the node (one short line)",
        )
    register_secret(token)
    if token and not _TOKEN_RE.fullmatch(token):
        raise ConfigError(
            f"the API token from {source} is not a token: it holds spaces, control or "
            "non-ASCII characters",
            f"copy it again from {NODE_TOKEN_FILE} on the node",
        )
    return token


def _token_for(
    flag_token: str | None, environ: dict[str, str] | os._Environ[str]
) -> tuple[str | None, list[str]]:
    if flag_token:
        return check_token(flag_token, "--token") or None, ["--token"]
    if environ.get("SPK_VISOR_TOKEN"):
        return check_token(environ["SPK_VISOR_TOKEN"], "SPK_VISOR_TOKEN") or None, [
            "SPK_VISOR_TOKEN"
        ]
    return None, ["--token", "SPK_VISOR_TOKEN"]


def _node_target(name: str, node: dict[str, Any], token: str | None, sources: list[str]) -> Target:
    token_file = node.get("token_file")
    if token is None and token_file:
        sources = [*sources, str(Path(token_file).expanduser())]
    if "ssh" in node:
        remote = node.get("remote_token_file", NODE_TOKEN_FILE)
        if token is None and not token_file:
            sources = [*sources, f"{remote} on the node (SFTP)"]
        return Target(
            name=name,
            ssh=parse_ssh(node["ssh"]),
            daemon_port=node.get("daemon_port", DEFAULT_DAEMON_PORT),
            token=token,
            token_sources=tuple(sources),
            token_file=token_file,
            remote_token_file=remote,
            remote_command=node.get("remote_command"),
        )
    return Target(
        name=name,
        url=_check_url(node["url"], f"nodes.{name}.url"),
        token=token,
        token_sources=tuple(sources),
        token_file=token_file,
    )


def _inventory_target(host: InventoryHost, token: str | None, sources: list[str]) -> Target:
    remote = host.token_file or NODE_TOKEN_FILE
    extra = [] if token else [f"{remote} on the node (SFTP)"]
    return Target(
        name=host.name,
        ssh=SshSpec(host=host.address, user=host.user, port=host.port),
        daemon_port=host.daemon_port or DEFAULT_DAEMON_PORT,
        token=token,
        token_sources=(*sources, *extra),
        remote_token_file=remote,
        remote_command=host.remote_command,
    )


def _inventory_path(
    flag: str | None, env: dict[str, str] | os._Environ[str], data: dict[str, Any], config: Path
) -> tuple[Path | None, bool]:
    """The inventory to read and whether it is the only source of groups (named by flag or
    environment) rather than a fallback after config.toml (named under [defaults])."""
    named = flag or env.get("SPK_VISOR_INVENTORY")
    if named:
        return Path(named).expanduser(), True
    default = data.get("defaults", {}).get("inventory")
    if default:
        path = Path(default).expanduser()
        # Relative to the config file, as a user reading that file would expect.
        return (path if path.is_absolute() else config.parent / path), False
    return None, False


def _env_daemon_port(env: dict[str, str] | os._Environ[str]) -> int | None:
    raw = env.get("SPK_VISOR_DAEMON_PORT")
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"SPK_VISOR_DAEMON_PORT={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"SPK_VISOR_DAEMON_PORT={raw!r}: port out of range 1..65535")
    return port


def resolve(
    *,
    node: str | None,
    ssh: str | None,
    fleet: str | None,
    token: str | None,
    timeout: float | None,
    accept_new: bool,
    daemon_port: int | None = None,
    environ: dict[str, str] | os._Environ[str] | None = None,
    ca_file: str | None = None,
    insecure_http: bool = False,
    inventory: str | None = None,
    parallel: int | None = None,
) -> Settings:
    """Build the settings once, validating everything (EXAMPLES.md A.4)."""
    env = os.environ if environ is None else environ
    node, ssh, fleet = node or None, ssh or None, fleet or None
    if sum(x is not None for x in (node, ssh, fleet)) > 1:
        raise ConfigError("give only one of --node, --ssh and --fleet")
    ssh_source = "--ssh"
    if node is None and ssh is None and fleet is None:
        # Only when no flag names the target: a flag wins over every variable (flag > env).
        ssh_source = "SPK_VISOR_SSH"
        node = env.get("SPK_VISOR_NODE") or None
        ssh = env.get("SPK_VISOR_SSH") or None
        fleet = env.get("SPK_VISOR_FLEET") or None
        if sum(x is not None for x in (node, ssh, fleet)) > 1:
            raise ConfigError(
                "set only one of SPK_VISOR_NODE, SPK_VISOR_SSH and SPK_VISOR_FLEET",
                "or name the target with --node, --ssh or --fleet",
            )
    if daemon_port is not None and not ssh:
        # Over HTTP the port is in the URL; a configured node has daemon_port in the file.
        raise ConfigError(
            "--daemon-port goes with --ssh",
            "for a node in the config file set daemon_port there; for --node URL put the "
            "port in the URL",
        )
    path = config_path(env)
    data = load_file(path)
    nodes: dict[str, Any] = data.get("nodes", {})
    groups: dict[str, list[str]] = data.get("groups", {})
    flag_token, sources = _token_for(token, env)
    inventory_path, inventory_only = _inventory_path(inventory, env, data, path)
    inv: Inventory | None = None
    if inventory_path is not None and (fleet or (node and "://" not in node)):
        from spk_visor.ansible_inventory import load as load_inventory  # noqa: PLC0415 (lazy)

        inv = load_inventory(inventory_path)
    if inventory_only:
        nodes, groups = {}, {}
    targets: list[Target]
    if fleet and inv is not None and fleet not in groups:
        targets = [_inventory_target(h, flag_token, sources) for h in inv.hosts(fleet)]
        if not targets:
            raise ConfigError(f"group {fleet!r} in {inventory_path} has no hosts")
    elif node and inv is not None and "://" not in node and node not in nodes:
        targets = [_inventory_target(inv.host(node), flag_token, sources)]
    elif fleet:
        if fleet not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise ConfigError(
                f"no group {fleet!r} in {path} (groups: {known})",
                ("use one of them, or " if groups else "")
                + "list the group's nodes under [groups] in that file "
                "(or give an Ansible inventory with -i)",
            )
        targets = [_node_target(n, nodes[n], flag_token, sources) for n in groups[fleet]]
    elif ssh:
        spec = parse_ssh(ssh, ssh_source)
        extra = [] if flag_token else [f"{NODE_TOKEN_FILE} on the node (SFTP)"]
        port = daemon_port if daemon_port is not None else _env_daemon_port(env)
        targets = [
            Target(
                name=spec.host,
                ssh=spec,
                daemon_port=port or DEFAULT_DAEMON_PORT,
                token=flag_token,
                token_sources=(*sources, *extra),
            )
        ]
    elif node and "://" in node:
        url = _check_url(node, "--node")
        targets = [Target(name=url, url=url, token=flag_token, token_sources=tuple(sources))]
    elif node:
        if node not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            raise ConfigError(
                f"no node {node!r} in {path} (nodes: {known})",
                "give a URL (http://HOST:8080) or add the node to the file",
            )
        targets = [_node_target(node, nodes[node], flag_token, sources)]
    else:
        # On a node's own shell: the local daemon and its token file.
        targets = [
            Target(
                name="local",
                url=LOCAL_URL,
                token=flag_token,
                token_sources=(*sources, NODE_TOKEN_FILE),
                token_file=None if flag_token else NODE_TOKEN_FILE,
            )
        ]
    file_timeout = data.get("defaults", {}).get("timeout")
    env_timeout = env.get("SPK_VISOR_TIMEOUT")
    timeout_source = "--timeout"
    if timeout is None and env_timeout:
        timeout_source = "SPK_VISOR_TIMEOUT"
        try:
            timeout = float(env_timeout)
        except ValueError:
            raise ConfigError(
                f"SPK_VISOR_TIMEOUT={env_timeout!r} is not a number of seconds",
                "set it to a number such as 30, or unset it to use the default",
            ) from None
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
        # Not `timeout or ...`: --timeout 0 must not quietly become the default.
        raise ConfigError(
            f"{timeout_source} {timeout:g}: must be a positive number of seconds, "
            f"at most {MAX_TIMEOUT:g}"
        )
    resolved_timeout = timeout if timeout is not None else file_timeout or DEFAULT_TIMEOUT
    resolved_parallel = _parallel(parallel, env, data.get("defaults", {}).get("parallel"))
    return Settings(
        targets=tuple(targets),
        fleet=fleet,
        timeout=float(resolved_timeout),
        accept_new=accept_new,
        config_path=path if data else None,
        ca_file=ca_file or env.get("SPK_VISOR_CA_FILE") or None,
        insecure_http=insecure_http,
        inventory_path=inventory_path,
        parallel=resolved_parallel,
    )


def _parallel(flag: int | None, env: dict[str, str] | os._Environ[str], file_value: Any) -> int:
    source, value = "--parallel", flag
    if value is None and env.get("SPK_VISOR_PARALLEL"):
        source = "SPK_VISOR_PARALLEL"
        try:
            value = int(env["SPK_VISOR_PARALLEL"])
        except ValueError:
            raise ConfigError(
                f"SPK_VISOR_PARALLEL={env['SPK_VISOR_PARALLEL']!r} is not a whole number"
            ) from None
    if value is None:
        source, value = "defaults.parallel", file_value
    if value is None:
        return DEFAULT_PARALLEL
    if not 1 <= value <= MAX_PARALLEL:
        raise ConfigError(f"{source} {value}: must be between 1 and {MAX_PARALLEL}")
    return int(value)


def read_local_token(target: Target) -> str | None:
    """The token from the target's local token file, None when there is no file to read."""
    if target.token or not target.token_file:
        return target.token
    path = Path(target.token_file).expanduser()
    try:
        raw = read_at_most(path, MAX_TOKEN_FILE_BYTES)
        if len(raw) > MAX_TOKEN_FILE_BYTES:
            # Refused, not cut: blanks then a long token would leave a shorter "token".
            raise ConfigError(
                f"token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes: not a token file",
                f"copy the token again from {NODE_TOKEN_FILE} on the node (one short line)",
            )
        return check_token(raw.decode("ascii"), f"token file {path}") or None
    except FileNotFoundError:
        return None
    except PermissionError:
        raise ConfigError(
            f"cannot read token file {path}: permission denied",
            "run as root on the node, join the daemon's token group (usermod -aG "
            "smechvisor USER), or pass --token / SPK_VISOR_TOKEN",
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read token file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read token file {path}: {e}") from e
