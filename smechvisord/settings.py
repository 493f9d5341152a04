"""Daemon settings: each SMECHVISORD_* variable, also a command-line flag (flag wins)."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from smechvisord.version import VERSION

N = TypeVar("N", int, float)


class SettingsError(ValueError):
    """A setting has a value the daemon cannot use; the message names it."""


@dataclass(frozen=True)
class Setting:
    env: str
    flag: str
    default: str
    help: str


# The table DESIGN.md documents; the man page and --help are generated from it.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "SMECHVISORD_BIND",
        "--bind",
        "0.0.0.0:8080",
        "listen address HOST:PORT; port 0 picks a free port and logs it",
    ),
    Setting(
        "SMECHVISORD_WEB_DIR",
        "--web-dir",
        "/usr/share/smechvisord/web",
        "dashboard assets; the packaged copy when that path does not exist",
    ),
    Setting(
        "SMECHVISORD_STATE_DIR",
        "--state-dir",
        "/var/lib/smechvisord",
        "VM records and logs; images in vms/",
    ),
    Setting("SMECHVISORD_RUN_DIR", "--run-dir", "/run/smechvisord", "VMM API sockets"),
    Setting(
        "SMECHVISORD_TOKEN_FILE",
        "--token-file",
        "/etc/smechvisord/token",
        "API token, created at first start: 0640 root:$TOKEN_GROUP, or 0600",
    ),
    Setting(
        "SMECHVISORD_TOKEN_GROUP",
        "--token-group",
        "smechvisor",
        "group whose members may read the API token (spk-visor over SSH as a non-root "
        "admin); ignored while no such group exists; empty: root only",
    ),
    Setting(
        "SMECHVISORD_TLS_CERT",
        "--tls-cert",
        "/etc/smechvisord/tls.crt",
        "TLS certificate (PEM, leaf first); a self-signed one is made at first start",
    ),
    Setting(
        "SMECHVISORD_TLS_KEY",
        "--tls-key",
        "/etc/smechvisord/tls.key",
        "TLS private key (PEM), made 0600 with the certificate at first start",
    ),
    Setting(
        "SMECHVISORD_OPENSSL",
        "--openssl",
        "openssl",
        "the openssl command that makes the first certificate",
    ),
    Setting(
        "SMECHVISORD_SYSROOT",
        "--sysroot",
        "/",
        "prefix for every /proc, /sys, /dev and efivars read about the host",
    ),
    Setting(
        "SMECHVISORD_CH_BIN",
        "--ch-bin",
        "cloud-hypervisor",
        "the VMM binary (a name on PATH or a path)",
    ),
    Setting(
        "SMECHVISORD_FIRMWARE",
        "--firmware",
        "/usr/share/cloud-hypervisor/CLOUDHV.fd",
        "what boots a disk image",
    ),
    Setting(
        "SMECHVISORD_IMAGE_DIRS",
        "--image-dirs",
        "",
        "colon-separated dirs a VM disk may come from (default $STATE_DIR/vms)",
    ),
    Setting("SMECHVISORD_MODPROBE", "--modprobe", "modprobe", "command for vfio-pci load/unload"),
    Setting("SMECHVISORD_REBOOT_CMD", "--reboot-cmd", "reboot", "command that reboots the host"),
    # Limits (design/daemon.md "Input, auth, limits"); rarely changed.
    Setting(
        "SMECHVISORD_MAX_CONNECTIONS",
        "--max-connections",
        "512",
        "concurrent client connections served; past it only GET /api/health is answered "
        "(others get an immediate 503)",
    ),
    Setting(
        "SMECHVISORD_MAX_CONNECTIONS_PER_SOURCE",
        "--max-connections-per-source",
        "64",
        "of those, how many one source address (an IPv6 /64) may hold",
    ),
    Setting(
        "SMECHVISORD_SOCKET_TIMEOUT",
        "--socket-timeout",
        "15",
        "seconds a client may stay silent in one read or write (at most the request timeout)",
    ),
    Setting(
        "SMECHVISORD_REQUEST_TIMEOUT",
        "--request-timeout",
        "10",
        "seconds for a whole request head (and body) to arrive, keep-alive idling "
        "included, however slowly it trickles",
    ),
    Setting(
        "SMECHVISORD_VM_LOG_MAX_MB",
        "--vm-log-max-mb",
        "16",
        "MiB of disk each log of a VM (serial, VMM log, events) may use; past it the oldest "
        "output is dropped, so a guest cannot fill the state dir",
    ),
)


@dataclass(frozen=True)
class Settings:
    bind_host: str
    bind_port: int
    web_dir: Path
    state_dir: Path
    run_dir: Path
    token_file: Path
    tls_cert: Path
    tls_key: Path
    openssl: str
    sysroot: Path
    ch_bin: str
    firmware: Path
    image_dirs: tuple[Path, ...]
    modprobe: tuple[str, ...]
    reboot_cmd: tuple[str, ...]
    max_connections: int = 512
    socket_timeout: float = 15.0
    max_connections_per_source: int = 64
    request_timeout: float = 10.0
    token_group: str = "smechvisor"  # noqa: S105 (a group name, not a secret)
    vm_log_max_mb: int = 16
    # v42 (and the stand-in) answer vmm.ping well under a second after exec.
    vmm_ready_timeout: float = 10.0
    version: str = VERSION

    @property
    def records_dir(self) -> Path:
        return self.state_dir / "machines"

    def host_path(self, path: str) -> Path:
        """Map an absolute host path (/proc/..., /sys/..., /dev/...) into the sysroot."""
        return self.sysroot / path.lstrip("/")


def parse_bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise SettingsError(f"SMECHVISORD_BIND: expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise SettingsError(f"SMECHVISORD_BIND: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise SettingsError(f"SMECHVISORD_BIND: port {number} is out of range 0..65535")
    return host, number


# What groupadd accepts (Debian's default NAME_REGEX, system groups included).
_GROUP_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def _group_name(value: str) -> str:
    name = value.strip()
    if name and not _GROUP_RE.fullmatch(name):
        raise SettingsError(
            f"SMECHVISORD_TOKEN_GROUP: {value!r} is not a group name "
            "(lower-case letters, digits, _ and -; empty for root only)"
        )
    return name


def _split_command(name: str, value: str) -> tuple[str, ...]:
    # Commands are split on whitespace, never handed to a shell.
    argv = tuple(value.split())
    if not argv:
        raise SettingsError(f"{name}: empty command")
    return argv


def _number(name: str, raw: Mapping[str, str], kind: type[N], low: N, high: N) -> N:
    try:
        value = kind(raw[name])
    except ValueError:
        raise SettingsError(f"{name}: {raw[name]!r} is not a number") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}: {value} is out of range {low}..{high}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smechvisord",
        description="SmechVisor node daemon: REST API and dashboard, cloud-hypervisor VMs.",
        epilog="Every flag may also be set by the environment variable shown with it.",
    )
    for s in SETTINGS:
        dest = s.env.removeprefix("SMECHVISORD_").lower()
        parser.add_argument(
            s.flag,
            dest=dest,
            metavar="VALUE",
            help=f"{s.help} [env {s.env}, default {s.default or 'see text'}]",
        )
    parser.add_argument("--version", action="version", version=f"smechvisord {VERSION}")
    # The OTA preflight runs this from a staged release before the swap: nothing is bound,
    # created or written, so it is safe while the live daemon runs.
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="load the settings, import every daemon module, check that the dashboard and "
        "state directories are usable, print one line and exit (0 ok, 1 failed, 2 bad settings)",
    )
    parser.add_argument(
        "--print-fingerprint",
        action="store_true",
        help="print the SHA-256 fingerprint of the TLS certificate (what `spk-visor "
        "--accept-new` records) and exit; 1 when there is no certificate yet",
    )
    return parser


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags, then the environment, then the defaults."""
    env = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    raw: dict[str, str] = {}
    flags: dict[str, str] = {}  # the settings given as flags: an error names the flag
    for s in SETTINGS:
        dest = s.env.removeprefix("SMECHVISORD_").lower()
        flag_value = args.get(dest)
        if flag_value is not None:
            flags[s.env] = s.flag
        raw[s.env] = flag_value if flag_value is not None else env.get(s.env, s.default)
    try:
        return _from_raw(raw)
    except SettingsError as e:
        name, sep, rest = str(e).partition(":")
        if sep and name in flags:
            raise SettingsError(f"{flags[name]}:{rest}") from None
        raise


def _from_raw(raw: Mapping[str, str]) -> Settings:
    host, port = parse_bind(raw["SMECHVISORD_BIND"])
    state_dir = Path(raw["SMECHVISORD_STATE_DIR"]).absolute()
    image_dirs_raw = raw["SMECHVISORD_IMAGE_DIRS"]
    image_dirs = tuple(Path(p).absolute() for p in image_dirs_raw.split(":") if p) or (
        state_dir / "vms",
    )
    return Settings(
        bind_host=host,
        bind_port=port,
        web_dir=Path(raw["SMECHVISORD_WEB_DIR"]),
        state_dir=state_dir,
        run_dir=Path(raw["SMECHVISORD_RUN_DIR"]).absolute(),
        token_file=Path(raw["SMECHVISORD_TOKEN_FILE"]).absolute(),
        tls_cert=Path(raw["SMECHVISORD_TLS_CERT"]).absolute(),
        tls_key=Path(raw["SMECHVISORD_TLS_KEY"]).absolute(),
        openssl=raw["SMECHVISORD_OPENSSL"],
        sysroot=Path(raw["SMECHVISORD_SYSROOT"]).absolute(),
        ch_bin=raw["SMECHVISORD_CH_BIN"],
        firmware=Path(raw["SMECHVISORD_FIRMWARE"]),
        image_dirs=image_dirs,
        modprobe=_split_command("SMECHVISORD_MODPROBE", raw["SMECHVISORD_MODPROBE"]),
        reboot_cmd=_split_command("SMECHVISORD_REBOOT_CMD", raw["SMECHVISORD_REBOOT_CMD"]),
        token_group=_group_name(raw["SMECHVISORD_TOKEN_GROUP"]),
        max_connections=_number("SMECHVISORD_MAX_CONNECTIONS", raw, int, 1, 10_000),
        socket_timeout=_number("SMECHVISORD_SOCKET_TIMEOUT", raw, float, 0.1, 3600.0),
        max_connections_per_source=_number(
            "SMECHVISORD_MAX_CONNECTIONS_PER_SOURCE", raw, int, 1, 10_000
        ),
        request_timeout=_number("SMECHVISORD_REQUEST_TIMEOUT", raw, float, 0.1, 3600.0),
        vm_log_max_mb=_number("SMECHVISORD_VM_LOG_MAX_MB", raw, int, 1, 1 << 20),
    )
