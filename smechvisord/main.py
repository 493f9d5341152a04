"""Entry point: settings, token, re-adoption of running VMs, then serve until SIGTERM."""

from __future__ import annotations

import errno
import importlib
import logging
import os
import pkgutil
import resource
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from types import FrameType

from smechvisord import settings as settings_mod
from smechvisord import statelock, tls
from smechvisord import token as tokens
from smechvisord.api import Api
from smechvisord.host import Host
from smechvisord.server import DaemonServer
from smechvisord.vms import VmManager

log = logging.getLogger("smechvisord")


def web_root(configured: Path) -> Path:
    """The configured dashboard dir, or the copy packaged with the daemon."""
    if configured.is_dir():
        return configured
    return Path(str(resources.files("smechvisord") / "web"))


def _usable_dir(path: Path, access: int) -> str | None:
    """Why `path` cannot serve as a directory the daemon needs, or None when it can.

    A missing directory is fine when the daemon could create it (it does at start):
    its nearest existing ancestor must be a writable directory.
    """
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"{path}: no existing ancestor"
        probe = probe.parent
        access = os.W_OK | os.X_OK
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, access):
        return f"{probe} is not {'writable' if access & os.W_OK else 'readable'}"
    return None


def self_check(cfg: settings_mod.Settings) -> tuple[str | None, int]:
    """(failure reason or None, modules imported): what `--self-check` verifies."""
    package = Path(__file__).resolve().parent
    names = [m.name for m in pkgutil.iter_modules([str(package)]) if m.name != "__main__"]
    for name in names:
        try:
            importlib.import_module(f"smechvisord.{name}")
        except Exception as e:  # any import failure (syntax, missing name) fails the check
            return f"cannot import smechvisord.{name}: {type(e).__name__}: {e}", len(names)
    web = web_root(cfg.web_dir)
    if not (web / "index.html").is_file():
        return f"dashboard directory {web} has no index.html", len(names)
    checks = [(web, os.R_OK | os.X_OK), (cfg.state_dir, os.W_OK | os.X_OK)]
    checks += [(d, os.W_OK | os.X_OK) for d in cfg.image_dirs]
    for path, access in checks:
        reason = _usable_dir(path, access)
        if reason:
            return reason, len(names)
    try:
        VmManager(cfg, Host(cfg.sysroot)).check_paths()
    except RuntimeError as e:
        return str(e), len(names)
    return None, len(names)


def print_fingerprint(cfg: settings_mod.Settings) -> int:
    """`--print-fingerprint`: what an operator compares with the one `spk-visor` shows
    before `--accept-new`. Reads only; the certificate is made by the daemon's first start."""
    try:
        fp = tls.fingerprint(tls.leaf_der(cfg.tls_cert))
    except FileNotFoundError:
        print(
            f"smechvisord: no TLS certificate at {cfg.tls_cert} yet: the daemon makes one "
            "at its first start (or install your own there)",
            file=sys.stderr,
        )
        return 1
    except (OSError, tls.CertificateUnavailable) as e:
        print(f"smechvisord: {e}", file=sys.stderr)
        return 1
    print(f"SHA256 Fingerprint={fp}  {cfg.tls_cert}")
    return 0


def open_gate(cfg: settings_mod.Settings, host: Host) -> tls.Gate:
    sans = tls.subject_names(
        socket.gethostname(), cfg.bind_host, tls.local_addresses(host.path("/proc/net"))
    )
    return tls.open_gate(
        cfg.tls_cert,
        cfg.tls_key,
        sans,
        deadline=min(tls.HANDSHAKE_DEADLINE, cfg.socket_timeout),
        openssl=cfg.openssl,
    )


def raise_fd_limit(wanted: int = 65536) -> None:
    """Raise the soft limit on open files toward the hard one. A slowloris attack holds
    a descriptor per socket (the overflow lane answers up to 4096 of them); at the common
    default of 1024, accept() would fail and no one, /api/health included, would get in."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d: %s", soft, e)


# The ways out of a listen address that cannot be used, for every way the daemon is run.
BIND_HINT = (
    "choose another address with --bind HOST:PORT or SMECHVISORD_BIND=HOST:PORT "
    "(make run: make run BIND=127.0.0.1:8081; OpenRC: SMECHVISORD_BIND in "
    "/etc/conf.d/smechvisord)"
)


def bind_failure(host: str, port: int, e: OSError) -> str | None:
    """What to tell the operator when the listen address cannot be used, or None when
    the error is not about the address."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(e, socket.gaierror):
        why = f"cannot resolve the host name {host!r}"
    elif e.errno == errno.EADDRINUSE:
        why = "the address is already in use (another smechvisord, or another service)"
    elif e.errno == errno.EADDRNOTAVAIL:
        why = f"no network interface of this machine has the address {host}"
    elif e.errno == errno.EACCES:
        why = "permission denied" + (" (ports below 1024 need root)" if port < 1024 else "")
    else:
        return None
    return f"cannot listen on {where}: {why}; {BIND_HINT}"


# The settings that name a path the daemon creates or opens at start, in the order a
# failure is attributed (the state directory holds the default image directory).
PATH_SETTINGS = (
    ("state_dir", "SMECHVISORD_STATE_DIR"),
    ("image_dirs", "SMECHVISORD_IMAGE_DIRS"),
    ("run_dir", "SMECHVISORD_RUN_DIR"),
    ("token_file", "SMECHVISORD_TOKEN_FILE"),
    ("tls_cert", "SMECHVISORD_TLS_CERT"),
    ("tls_key", "SMECHVISORD_TLS_KEY"),
)


def path_failure(cfg: settings_mod.Settings, e: OSError) -> str | None:
    """What to tell the operator when a path a setting names (or a folder above it)
    cannot be created or opened: a path under a file, on a read-only or virtual file
    system. None when the failure is about another path."""
    if not e.filename:
        return None
    failed = Path(os.fsdecode(e.filename)).absolute()
    flags = {s.env: s.flag for s in settings_mod.SETTINGS}
    for attr, env in PATH_SETTINGS:
        value = getattr(cfg, attr)
        for path in value if isinstance(value, tuple) else (value,):
            if failed == path or failed in path.parents:
                why = (e.strerror or type(e).__name__).lower()
                return (
                    f"cannot create or open {path}: {why} ({failed}); choose another with "
                    f"{flags[env]} PATH or {env}=PATH (OpenRC: {env} in "
                    "/etc/conf.d/smechvisord)"
                )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = settings_mod.build_parser().parse_args(argv)
    if args.print_fingerprint:
        try:
            return print_fingerprint(settings_mod.load(argv))
        except settings_mod.SettingsError as e:
            print(f"smechvisord: {e}", file=sys.stderr)
            return 2
    if args.self_check:
        try:
            cfg = settings_mod.load(argv)
        except settings_mod.SettingsError as e:
            print(f"smechvisord: self-check failed: {e}", file=sys.stderr)
            return 2
        reason, modules = self_check(cfg)
        if reason:
            print(f"smechvisord: self-check failed: {reason}", file=sys.stderr)
            return 1
        print(f"smechvisord {cfg.version}: self-check ok ({modules} modules, {cfg.state_dir})")
        return 0
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s smechvisord %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = settings_mod.load(argv)
    except settings_mod.SettingsError as e:
        print(f"smechvisord: {e}", file=sys.stderr)
        return 2
    raise_fd_limit()
    try:
        token = tokens.load_or_create(cfg.token_file, cfg.token_group)
        cfg.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        lock_fd = statelock.acquire(cfg.state_dir)  # held (open) until the process exits
        for d in cfg.image_dirs:
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
        host = Host(cfg.sysroot)
        vms = VmManager(cfg, host)
        vms.check_paths()
        vms.load()
        gate = open_gate(cfg, host)
        try:
            server = DaemonServer(
                (cfg.bind_host, cfg.bind_port),
                Api(cfg, host, vms).router(),
                token,
                web_root(cfg.web_dir),
                cfg.max_connections,
                cfg.socket_timeout,
                gate=gate,
                per_source=cfg.max_connections_per_source,
                head_timeout=cfg.request_timeout,
            )
        except OSError as e:
            reason = bind_failure(cfg.bind_host, cfg.bind_port, e)
            if reason is None:
                raise
            log.error("cannot start: %s", reason)
            return 2
    except statelock.StateDirBusyError as e:
        log.error("cannot start: %s", e)
        return 2
    except (OSError, RuntimeError, tokens.TokenError) as e:
        # The token file's reader wraps the OSError that names the path.
        cause = e if isinstance(e, OSError) else e.__cause__
        reason = path_failure(cfg, cause) if isinstance(cause, OSError) else None
        log.error("cannot start: %s", reason or e)
        return 1 if reason is None else 2

    host_name, port = server.server_address[:2]
    log.info("listening on http://%s:%d", host_name, port)
    if gate.context is not None:
        log.info(
            "serving https://%s:%d to every client; plain http to loopback clients only",
            host_name,
            port,
        )
    shown = "127.0.0.1" if cfg.bind_host in ("0.0.0.0", "::", "") else cfg.bind_host  # noqa: S104
    # Plain HTTP is served to loopback clients only: any other address gets the https URL.
    scheme = "http" if tls.is_loopback(shown) else "https"
    if ":" in shown:
        shown = f"[{shown}]"
    url = f"{scheme}://{shown}:{port}/"
    if sys.stderr.isatty():
        # Interactive start (make run): hand the operator a ready link, as Jupyter does.
        print(f"dashboard: {url}#token={token}", file=sys.stderr, flush=True)
    else:
        # Logs go to files others may read: never the token itself.
        log.info("dashboard: %s (token in %s)", url, cfg.token_file)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping; VMs keep running", signum)
        # shutdown() waits for serve_forever to return, so not from this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    vms.start_monitor()
    try:
        # serve_forever sees shutdown() only at its next poll: 0.1 s keeps an OTA swap's
        # stop short (0.5 s cost ~0.3 s of downtime) for ten cheap wake-ups a second.
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        vms.stop_monitor()
        vms.persist_all()
    log.info("stopped; %d VMs left running", vms.running_count())
    os.close(lock_fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
