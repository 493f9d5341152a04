"""Daemon release trees built from this checkout's smechvisord, and their packs/manifests.

A release tree is what /opt/smechvisord/releases/<id> holds:

    bin/smechvisord                 launcher: this venv's python, `<tree>/lib` first on sys.path
    lib/smechvisord/...             a copy of the package, version.py set to the release's version
    lib/smechvisord/**/__pycache__  bytecode compiled with checked-hash invalidation

The bytecode is part of the tree (and so of the signed manifest): a release directory is
read-only, so without it every start compiles every module again (~70 ms here), and a
checked-hash .pyc stays valid whatever mtimes staging gives the files. The launcher runs
with -B so the daemon never writes bytecode into its release.

Unhealthy variants pass the preflight (`--self-check`) but fail in service:
  "wrong_version"  starts and answers /api/health, with a version the manifest does not name
  "exit"           exits 1 at once (supervise-daemon keeps respawning it)
  "dies"           healthy for two health probes, then exits (the PID changes on respawn)
  "selfcheck"      fails the preflight too (nothing is ever switched)

`tree_manifest` turns a tree into the pack blob (file contents concatenated in `files`
order) and a manifest payload; the real build side (spk_visor.ota.build) may replace it.

`OtaNode` is a temp OTA sysroot plus the shipped init script installed under a unique
OpenRC service name; `prompt_reaper` makes this process reap orphaned supervisors at once.
"""

from __future__ import annotations

import compileall
import contextlib
import ctypes
import hashlib
import io
import json
import os
import py_compile
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spk_visor.ota.context import OtaContext
from spk_visor.ota.durable import CRASH_ENV
from spk_visor.ota.nodeconf import NodePaths, load_config
from spk_visor.ota.store import BlobStore
from spk_visor.trust import manifest
from spk_visor.trust.manifest import MANIFEST_TYPE, PRODUCT, Manifest
from tests.support import sysroots
from tests.support.health import health
from tests.support.hostpaths import HostPaths

PACKAGE = Path(__file__).resolve().parents[2] / "smechvisord"
FAILURES = ("wrong_version", "exit", "dies", "selfcheck")

LAUNCHER = """\
#!{python} -IB
# smechvisord release launcher: run the package of this release tree, whatever `current`
# points to later (realpath pins the tree at exec time).
import os
import sys

TREE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path.insert(0, os.path.join(TREE, "lib"))
{failure}
from smechvisord.main import main

raise SystemExit(main())
"""

FAILURE_CODE = {
    "": "",
    "wrong_version": "",  # version.py says so
    "exit": 'if "--self-check" not in sys.argv:\n    raise SystemExit(1)\n',
    "selfcheck": "raise SystemExit(1)\n",
    "dies": """\
if "--self-check" not in sys.argv:
    import smechvisord.api as _api

    _health = _api.Api.health
    _calls = [0]

    def _dying_health(self, req):
        _calls[0] += 1
        if _calls[0] > 2:
            os._exit(3)
        return _health(self, req)

    _api.Api.health = _dying_health
""",
}


def make_daemon_tree(
    dest: Path,
    version: str,
    *,
    healthy: bool = True,
    failure: str = "wrong_version",
    bytecode: bool = True,
) -> Path:
    """Build a release tree at `dest` (created) whose daemon reports `version` when healthy."""
    if not healthy and failure not in FAILURES:
        raise ValueError(f"failure must be one of {FAILURES}")
    mode = "" if healthy else failure
    lib = dest / "lib" / "smechvisord"
    shutil.copytree(PACKAGE, lib, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    reported = f"{version}+broken" if mode == "wrong_version" else version
    (lib / "version.py").write_text(f'"""Release {version}."""\n\nVERSION = {reported!r}\n')
    if bytecode:
        compileall.compile_dir(
            lib,
            quiet=1,
            invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
        )
    launcher = dest / "bin" / "smechvisord"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(LAUNCHER.format(python=sys.executable, failure=FAILURE_CODE[mode]))
    launcher.chmod(0o755)
    return dest


def tree_manifest(
    tree: Path,
    version: str,
    counter: int,
    *,
    service: str = "smechvisord",
    set_floor: int = 0,
    probation_s: float = 1.0,
    interval_s: float = 0.2,
    max_pid_changes: int = 0,
    preflight: bool = True,
    rollback_safe: bool = True,
) -> tuple[dict[str, Any], bytes]:
    """(manifest payload, pack bytes) for the daemon tree at `tree`."""
    files: list[dict[str, Any]] = []
    symlinks: list[dict[str, str]] = []
    pack = io.BytesIO()
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]):
            path = Path(dirpath, name)
            rel = path.relative_to(tree).as_posix()
            if path.is_symlink():
                symlinks.append({"p": rel, "t": os.readlink(path)})
                continue
            data = path.read_bytes()
            pack.write(data)
            files.append(
                {
                    "p": rel,
                    "m": path.stat().st_mode & 0o755,
                    "s": len(data),
                    "h": hashlib.sha256(data).hexdigest(),
                }
            )
    blob = pack.getvalue()
    pack_id = f"sha256:{hashlib.sha256(blob).hexdigest()}"
    component: dict[str, Any] = {
        "class": "daemon",
        "version": version,
        "service": service,
        "tree": {"pack": pack_id, "encoding": "identity", "files": files, "symlinks": symlinks},
        "health": {
            "timeout_s": 2,
            "probation_s": probation_s,
            "interval_s": interval_s,
            "max_pid_changes": max_pid_changes,
        },
        "rollback_safe": rollback_safe,
    }
    if preflight:
        component["preflight"] = {"argv": ["bin/smechvisord", "--self-check"], "timeout_s": 20}
    payload = {
        "type": MANIFEST_TYPE,
        "product": PRODUCT,
        "compatible": ["smechvisor/x86_64"],
        "dev": True,
        "created": "2026-01-01T00:00:00Z",
        "release": {"version": version, "counter": counter, "set_floor": set_floor},
        "requires": {"agent_min": "0", "features": []},
        "components": {"smechvisord": component},
        "blobs": [{"id": pack_id, "size": len(blob)}],
    }
    return payload, blob


def payload_hex(payload: dict[str, Any]) -> str:
    """A stand-in for the manifest hash (sha256 of the payload bytes the signer would sign)."""
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


def ingest_pack(store: BlobStore, payload: dict[str, Any], pack: bytes) -> Path:
    """Put the pack blob into the node's store, as the fetch/bundle step would."""
    blob_id = payload["blobs"][0]["id"]
    return store.ingest(io.BytesIO(pack), blob_id, len(pack))


# ---- a node with a real OpenRC service running releases from a temp sysroot ----------------

OPENRC_DIR = PACKAGE / "openrc"
INIT_D = Path("/etc/init.d")
CONF_D = Path("/etc/conf.d")
RC_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Release:
    version: str
    manifest: Manifest
    hex: str
    payload_file: Path

    @property
    def release_id(self) -> str:
        return f"{self.version}-{self.hex[:8]}"


@dataclass
class OtaNode:
    """A temp OTA sysroot plus the shipped smechvisord init script installed under a
    unique name (/etc/init.d/spkota-<uuid8>) whose daemon is <sysroot>/opt/.../current.

    Needs root and OpenRC (`/run/openrc/softlevel`); `remove()` stops the service, kills
    only the PIDs it recorded, and deletes the script and its conf.d.
    """

    root: Path
    name: str = field(default_factory=lambda: f"spkota-{uuid.uuid4().hex[:8]}")
    port: int = field(default_factory=free_port)
    conf_extra: dict[str, str] = field(default_factory=dict)
    host: HostPaths = field(default_factory=HostPaths)

    def __post_init__(self) -> None:
        self.sysroot = self.root / "sysroot"
        self.paths = NodePaths(self.sysroot)
        self.log = self.root / "smechvisord.log"
        # AF_UNIX paths are limited to 108 bytes and pytest's tmp paths are long.
        self.run_dir = Path(tempfile.mkdtemp(prefix="svota", dir="/tmp"))
        conf = self.paths.conf
        conf.parent.mkdir(parents=True)
        conf.write_text(
            f'service = "{self.name}"\n'
            f'health_url = "http://127.0.0.1:{self.port}/api/health"\n'
            'rc_service = "rc-service"\n'
        )
        self.settings = {
            "SMECHVISORD_BIN": str(self.paths.current / "bin" / "smechvisord"),
            "SMECHVISORD_LOG": str(self.log),
            "SMECHVISORD_BIND": f"127.0.0.1:{self.port}",
            "SMECHVISORD_STATE_DIR": str(self.root / "state"),
            "SMECHVISORD_RUN_DIR": str(self.run_dir),
            "SMECHVISORD_TOKEN_FILE": str(self.root / "etc" / "token"),
            "SMECHVISORD_TLS_CERT": str(self.root / "etc" / "tls.crt"),
            "SMECHVISORD_TLS_KEY": str(self.root / "etc" / "tls.key"),
            "SMECHVISORD_SYSROOT": str(sysroots.build("intel-ready", self.root / "hostroot")),
            **self.conf_extra,
        }
        # The swap's preflight reads the service's settings under the OTA sysroot, as on a
        # node; the host's OpenRC reads its own copy, written by install().
        sysroot_conf = self.sysroot / "etc" / "conf.d" / self.name
        sysroot_conf.parent.mkdir(parents=True)
        sysroot_conf.write_text("".join(f"{k}='{v}'\n" for k, v in self.settings.items()))

    # -- the service ---------------------------------------------------------------------

    def install(self) -> None:
        # /etc/conf.d may be missing (Debian's openrc does not ship it): `remove` takes
        # away exactly what this made.
        init = self.host.adopt(self.host.dir(INIT_D) / self.name)
        shutil.copyfile(OPENRC_DIR / "smechvisord", init)
        init.chmod(0o755)
        lines = "".join(f"{k}='{v}'\n" for k, v in self.settings.items())
        self.host.file(
            CONF_D / self.name, (OPENRC_DIR / "smechvisord.confd").read_text() + "\n" + lines
        )

    def rc(self, action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rc-service", self.name, action],
            check=False,
            capture_output=True,
            text=True,
            timeout=RC_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )

    def _pid(self, path: Path) -> int | None:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def child_pid(self) -> int | None:
        return self._pid(Path(f"/run/openrc/options/{self.name}/child_pid"))

    def remove(self) -> None:
        try:
            self.rc("stop")
        finally:
            for pid in (self._pid(Path(f"/run/{self.name}.pid")), self.child_pid()):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.rc("zap")
            self.host.cleanup()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def health(self) -> dict[str, Any] | None:
        return health(self.port)

    # -- OTA side --------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_VISOR_OTA_")}
        env["SPK_VISOR_OTA_SYSROOT"] = str(self.sysroot)
        return env

    def ctx(self) -> OtaContext:
        return OtaContext(self.paths, load_config(self.paths))

    def release(self, version: str, counter: int, **kwargs: Any) -> Release:
        """Build a release tree, put its pack into the node's store, write its payload.

        kwargs: make_daemon_tree's (healthy, failure, bytecode) and tree_manifest's.
        """
        tree_kw = {k: kwargs.pop(k) for k in ("healthy", "failure", "bytecode") if k in kwargs}
        tree = make_daemon_tree(self.root / "build" / f"{version}-{uuid.uuid4().hex[:6]}",
                                version, **tree_kw)  # fmt: skip
        payload, pack = tree_manifest(tree, version, counter, service=self.name, **kwargs)
        hex_ = payload_hex(payload)
        ingest_pack(BlobStore(self.paths), payload, pack)
        payload_file = self.root / "build" / f"{hex_}.json"
        payload_file.write_text(json.dumps(payload))
        return Release(version, manifest.parse(payload), hex_, payload_file)

    def worker(self, *args: str, crash_at: str | None = None, timeout: float = 120.0
               ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run tests.support.ota_swap_worker as its own process (killed at `crash_at`)."""
        env = self.env()
        if crash_at:
            env[CRASH_ENV] = crash_at
        return subprocess.run(
            [sys.executable, "-m", "tests.support.ota_swap_worker", *args],
            cwd=PACKAGE.parent,
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def apply(self, rel: Release, crash_at: str | None = None, manual_commit: bool = False
              ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        extra = ["--manual-commit"] if manual_commit else []
        return self.worker("run", str(rel.payload_file), rel.hex, *extra, crash_at=crash_at)


# ---- a prompt reaper for orphaned supervisors ---------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


def _comm_and_state(pid: int) -> tuple[str, str]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", ""
    return raw[raw.find("(") + 1 : raw.rfind(")")], raw.rpartition(")")[2].split()[0]


@contextlib.contextmanager
def prompt_reaper() -> Iterator[None]:
    """Reap orphaned supervise-daemon processes the moment they exit, as a node's init does.

    `rc-service stop` waits until the supervisor's PID is gone, and an exited supervisor
    (an orphan: it daemonized) stays a zombie until its parent reaps it. A node's init
    reaps at once; this sandbox's PID 1 takes ~1.7 s (see pid1_reap_delay_ms), which
    would add that much to every measured downtime. So this process becomes a child
    subreaper (orphans started below it are re-parented to it) and a thread reaps exited
    supervise-daemon children; any other child is left to its owner (subprocess).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    stop = threading.Event()

    def our_zombie_supervisors() -> list[int]:
        me = str(os.getpid())
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            comm = raw[raw.find("(") + 1 : raw.rfind(")")]
            fields = raw.rpartition(")")[2].split()
            if fields[:2] == ["Z", me] and comm.startswith("supervise-d"):
                found.append(int(entry))
        return found

    last_scan = 0.0

    def reap_once() -> None:
        nonlocal last_scan
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT | os.WNOHANG)
            except ChildProcessError:
                return
            if info is None:
                return
            if _comm_and_state(info.si_pid)[0].startswith("supervise-d"):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.si_pid, 0)
                continue
            # Another child exited first and waitid keeps naming it (a detached OTA worker
            # that was re-parented here): find exited supervisors behind it by their PIDs.
            now = time.monotonic()
            if now - last_scan > 0.05:
                last_scan = now
                for pid in our_zombie_supervisors():
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
            return

    def loop() -> None:
        while not stop.wait(0.003):
            reap_once()

    thread = threading.Thread(target=loop, name="prompt-reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        reap_once()
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def pid1_reap_delay_ms(samples: int = 3) -> float:
    """How long this machine's PID 1 leaves an orphaned zombie unreaped (median, ms)."""
    delays = []
    for _ in range(samples):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            grandchild = os.fork()
            if grandchild == 0:
                time.sleep(0.05)
                os._exit(0)
            os.write(w, str(grandchild).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        os.close(w)
        orphan = int(os.read(r, 32))
        os.close(r)
        zombie_at = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = _comm_and_state(orphan)[1]
            if not state:
                break
            if state == "Z" and zombie_at is None:
                zombie_at = time.monotonic()
            time.sleep(0.002)
        delays.append((time.monotonic() - zombie_at) * 1000 if zombie_at else 0.0)
    return sorted(delays)[len(delays) // 2]
