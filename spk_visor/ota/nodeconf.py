"""Where OTA state lives on a node, and the node's OTA configuration.

Every node path hangs off one prefix, SPK_VISOR_OTA_SYSROOT (default "/"), so tests and
a `make run` sandbox use a temporary root while the layout stays the spec's:

    etc/spk-visor/ota.conf              node configuration (TOML, below)
    etc/spk-visor/health.d/{required,wanted}/   node-local health checks
    usr/lib/spk-visor/root.json         factory trust anchor (read-only in the base image)
    var/lib/spk-visor/ota/              state.json, floor.json, history.jsonl, trust/, store/
    opt/smechvisord/releases/<id>       immutable daemon release trees
    opt/smechvisord/current, previous   what OpenRC runs, and the rollback target
    run/lock/spk-visor-ota.lock         the OTA lock

ota.conf (every key optional):

    channel = "stable"
    base_urls = ["https://updates.example.net/smechvisor"]   # mirrors, tried in order
    node_id = ""                          # default: /etc/machine-id
    allow_channel_revert = true           # a signed channel may point below installed
    apply_daemon = true                   # pull: swap the daemon live
    stage_base = false                    # pull: write the base image to the other slot
    service = "smechvisord"               # the OpenRC service of the daemon
    health_url = "http://127.0.0.1:8080/api/health"
    rc_service = "rc-service"             # command, split on spaces
    probation_s = 0                       # 0: the manifest's value
    fetch_attempts = 4                    # per mirror and object, with backoff between
    fetch_backoff_s = 1.0                 # first pause; doubles per attempt
    fetch_timeout_s = 30.0                # per request
    [slots]
    a = "/dev/disk/by-partlabel/root-a"
    b = "/dev/disk/by-partlabel/root-b"
    grubenv = "/boot/grub/grubenv"
    grub_editenv = "grub-editenv"
    entry_a = "smechvisor-a"              # GRUB menu entry ids of the two slots
    entry_b = "smechvisor-b"
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spk_visor.capped_read import read_at_most
from spk_visor.errors import ConfigError

SYSROOT_ENV = "SPK_VISOR_OTA_SYSROOT"
CONF_ENV = "SPK_VISOR_OTA_CONF"
# ota.conf is a few lines of TOML.
MAX_CONF_BYTES = 1 << 20


@dataclass(frozen=True)
class NodePaths:
    """Every OTA path of a node, under one sysroot."""

    sysroot: Path

    def _p(self, rel: str) -> Path:
        return self.sysroot / rel

    @property
    def conf(self) -> Path:
        override = os.environ.get(CONF_ENV)
        return Path(override) if override else self._p("etc/spk-visor/ota.conf")

    @property
    def health_d(self) -> Path:
        return self._p("etc/spk-visor/health.d")

    @property
    def factory_root(self) -> Path:
        return self._p("usr/lib/spk-visor/root.json")

    @property
    def state_dir(self) -> Path:
        return self._p("var/lib/spk-visor/ota")

    @property
    def journal(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def floor(self) -> Path:
        return self.state_dir / "floor.json"

    @property
    def history(self) -> Path:
        return self.state_dir / "history.jsonl"

    @property
    def trust_dir(self) -> Path:
        return self.state_dir / "trust"

    @property
    def store(self) -> Path:
        return self.state_dir / "store"

    @property
    def worker_log(self) -> Path:
        return self.state_dir / "worker.log"

    @property
    def opt(self) -> Path:
        return self._p("opt/smechvisord")

    @property
    def releases(self) -> Path:
        return self.opt / "releases"

    @property
    def current(self) -> Path:
        return self.opt / "current"

    @property
    def previous(self) -> Path:
        return self.opt / "previous"

    @property
    def lock(self) -> Path:
        return self._p("run/lock/spk-visor-ota.lock")

    @property
    def machine_id(self) -> Path:
        return self._p("etc/machine-id")


def node_paths() -> NodePaths:
    """The node's paths; a sysroot that is not a folder is a mistake in the variable, not
    a fresh node with nothing installed."""
    root = Path(os.environ.get(SYSROOT_ENV) or "/")
    if not root.is_dir():
        why = "does not exist" if not root.exists() else "is not a folder"
        raise ConfigError(
            f"{SYSROOT_ENV}={root}: {why}",
            f"set {SYSROOT_ENV} to the node's root folder, or unset it for /",
        )
    return NodePaths(root)


@dataclass(frozen=True)
class Slots:
    a: str = "/dev/disk/by-partlabel/root-a"
    b: str = "/dev/disk/by-partlabel/root-b"
    grubenv: str = "/boot/grub/grubenv"
    grub_editenv: tuple[str, ...] = ("grub-editenv",)
    entry_a: str = "smechvisor-a"
    entry_b: str = "smechvisor-b"

    def device(self, slot: str) -> str:
        return self.a if slot == "a" else self.b

    def entry(self, slot: str) -> str:
        return self.entry_a if slot == "a" else self.entry_b


@dataclass(frozen=True)
class NodeConfig:
    channel: str = "stable"
    base_urls: tuple[str, ...] = ()
    node_id: str = ""
    allow_channel_revert: bool = True
    apply_daemon: bool = True
    stage_base: bool = False
    service: str = "smechvisord"
    health_url: str = "http://127.0.0.1:8080/api/health"
    rc_service: tuple[str, ...] = ("rc-service",)
    probation_s: float = 0.0
    fetch_attempts: int = 4
    fetch_backoff_s: float = 1.0
    fetch_timeout_s: float = 30.0
    slots: Slots = field(default_factory=Slots)


_STR = {"channel", "node_id", "service", "health_url"}
_BOOL = {"allow_channel_revert", "apply_daemon", "stage_base"}
_SLOT_STR = {"a", "b", "grubenv", "entry_a", "entry_b"}


# A channel name becomes a file name in the repository and in the node's state folder.
_CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def channel_problem(name: str) -> str | None:
    """Why `name` cannot be a channel's name, or None."""
    if _CHANNEL_NAME.fullmatch(name):
        return None
    return (
        f"{name!r} is not a channel name: 1-64 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )


def _is_http_url(url: str) -> bool:
    """A mirror URL the fetcher can use. Checked when ota.conf is read: a typo found only
    at fetch time read as a transient failure (exit 7) that no retry would fix."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


def _want(cond: bool, path: Path, key: str, what: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: `{key}` must be {what}", "fix the file and run again")


def load_config(paths: NodePaths) -> NodeConfig:
    """Read ota.conf; a missing file means every default. Unknown keys are errors."""
    path = paths.conf
    try:
        raw = read_at_most(path, MAX_CONF_BYTES)
    except FileNotFoundError:
        return NodeConfig()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    if len(raw) > MAX_CONF_BYTES:
        raise ConfigError(
            f"{path} is larger than {MAX_CONF_BYTES} bytes", "fix the file and run again"
        )
    try:
        doc: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}", "fix the file and run again") from e
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _STR:
            _want(isinstance(value, str), path, key, "a string")
            if key == "channel":
                _want(channel_problem(value) is None, path, key, "a channel name (a-z, 0-9, . _ -)")
            values[key] = value
        elif key in _BOOL:
            _want(isinstance(value, bool), path, key, "true or false")
            values[key] = value
        elif key == "base_urls":
            ok = isinstance(value, list) and all(isinstance(u, str) for u in value)
            _want(ok, path, key, "a list of URLs")
            for url in value:
                _want(
                    _is_http_url(url),
                    path,
                    key,
                    f"http(s) URLs: {url!r} is not one (https://HOST/PATH)",
                )
            values[key] = tuple(u.rstrip("/") for u in value)
        elif key == "rc_service":
            _want(isinstance(value, str) and bool(value.strip()), path, key, "a command")
            values[key] = tuple(shlex.split(value))
        elif key == "fetch_attempts":
            ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100
            _want(ok, path, key, "an integer in 1..100")
            values[key] = value
        elif key in ("fetch_backoff_s", "fetch_timeout_s"):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            _want(ok, path, key, "a number of seconds > 0")
            values[key] = float(value)
        elif key == "probation_s":
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
            _want(ok, path, key, "a number of seconds >= 0")
            values[key] = float(value)
        elif key == "slots":
            _want(isinstance(value, dict), path, key, "a table")
            values[key] = _slots(path, value)
        else:
            raise ConfigError(f"{path}: unknown key `{key}`", "see spk-visor(1), FILES")
    return NodeConfig(**values)


def _slots(path: Path, table: dict[str, Any]) -> Slots:
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in _SLOT_STR:
            _want(isinstance(value, str) and bool(value), path, f"slots.{key}", "a string")
            values[key] = value
        elif key == "grub_editenv":
            _want(isinstance(value, str) and bool(value.strip()), path, key, "a command")
            values[key] = tuple(shlex.split(value))
        else:
            raise ConfigError(f"{path}: unknown key `slots.{key}`", "see spk-visor(1), FILES")
    return Slots(**values)


def node_id(paths: NodePaths, config: NodeConfig) -> str:
    """The id rollout buckets hash: the configured one, else /etc/machine-id."""
    if config.node_id:
        return config.node_id
    try:
        return paths.machine_id.read_text().strip()
    except OSError:
        return ""
