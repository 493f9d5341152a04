"""The shipped OpenRC scripts, run by the real OpenRC (root).

Each test installs a script as /etc/init.d/<unique name> with its conf.d beside it, drives
it with `rc-service`, and removes both afterwards. `/run/openrc/softlevel` (made by
scripts/install-sysdeps) lets rc-service work on a machine that OpenRC did not boot.
Nothing here passes --nodeps: the dependencies the scripts declare are resolved for real
(see the comment in smechvisord/openrc/smechvisord on `use net`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smechvisord.settings import SETTINGS
from tests.support import sysroots
from tests.support.health import health
from tests.support.hostpaths import host_paths
from tests.support.prereq import need_command, need_root

OPENRC_DIR = Path(__file__).resolve().parents[2] / "smechvisord" / "openrc"
INIT_D = Path("/etc/init.d")
CONF_D = Path("/etc/conf.d")
SOFTLEVEL = Path("/run/openrc/softlevel")
RC_TIMEOUT = 120.0


# --- files, no root needed ---------------------------------------------------------------


def _exported(script: str) -> list[str]:
    match = re.search(r"^\s*export\s+((?:[^\n]*\\\n)*[^\n]*)$", script, re.MULTILINE)
    assert match, "the init script exports no settings"
    return match.group(1).replace("\\\n", " ").split()


def test_init_script_exports_every_setting() -> None:
    script = (OPENRC_DIR / "smechvisord").read_text()
    assert sorted(_exported(script)) == sorted(s.env for s in SETTINGS)


def test_confd_lists_every_setting_with_its_default() -> None:
    text = (OPENRC_DIR / "smechvisord.confd").read_text()
    listed = dict(re.findall(r'^#(SMECHVISORD_[A-Z_]+)="([^"]*)"$', text, re.MULTILINE))
    for s in SETTINGS:
        assert listed.get(s.env) == s.default, f"{s.env} in smechvisord.confd"
    assert listed["SMECHVISORD_BIN"] == "/opt/smechvisord/current/bin/smechvisord"
    assert listed["SMECHVISORD_LOG"] == "/var/log/smechvisord.log"
    assert set(listed) == {s.env for s in SETTINGS} | {"SMECHVISORD_BIN", "SMECHVISORD_LOG"}


@pytest.mark.parametrize("name", ["smechvisord", "vhost-user-gpu"])
def test_scripts_are_executable_openrc_scripts(name: str) -> None:
    path = OPENRC_DIR / name
    assert path.read_text().startswith("#!/sbin/openrc-run\n")
    assert path.stat().st_mode & stat.S_IXUSR
    for f in (path, OPENRC_DIR / f"{name}.confd"):
        subprocess.run(["sh", "-n", str(f)], check=True)


# --- helpers for the real OpenRC -----------------------------------------------------------


@pytest.fixture
def openrc() -> None:
    need_root()
    need_command("rc-service", "openrc")
    need_command("openrc-run", "openrc")
    if not SOFTLEVEL.exists():
        pytest.skip(
            f"{SOFTLEVEL} is missing, so rc-service refuses to run on a machine OpenRC did "
            "not boot: run scripts/install-sysdeps (make sysdeps) as root"
        )


def rc(name: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rc-service", name, *command],
        check=False,
        capture_output=True,
        text=True,
        timeout=RC_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def rc_ok(name: str, *command: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = rc(name, *command)
    if result.returncode != 0:
        logged = log.read_text(errors="replace") if log and log.exists() else "(no log)"
        pytest.fail(
            f"rc-service {name} {' '.join(command)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\nservice log:\n{logged}"
        )
    return result


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that does not reap it."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat_line.rpartition(")")[2].split()[0] not in {"Z", "X"}


def gone(pid: int) -> Callable[[], bool]:
    return lambda: not alive(pid)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def supervisor_pid(name: str) -> int | None:
    """The PID in the service's pidfile: supervise-daemon's, for both scripts."""
    return _read_pid(Path(f"/run/{name}.pid"))


def child_pid(name: str) -> int | None:
    """The supervised daemon's PID, as supervise-daemon records it in OpenRC's state."""
    return _read_pid(Path(f"/run/openrc/options/{name}/child_pid"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def shell_assign(name: str, value: str) -> str:
    # conf.d files are sourced by sh: single-quote the value.
    return f"{name}='{value}'\n" if "'" not in value else pytest.fail(f"quote in {value!r}")


@contextlib.contextmanager
def installed_service(script: str, confd: str, extra: dict[str, str]) -> Iterator[str]:
    """Install `script` and its shipped conf.d (plus `extra`) under a unique name."""
    name = f"{script}-test-{uuid.uuid4().hex[:8]}"
    with host_paths() as made:
        # Debian's openrc ships no /etc/conf.d: made here when missing, removed after.
        init = made.adopt(made.dir(INIT_D) / name)
        shutil.copyfile(OPENRC_DIR / script, init)
        init.chmod(0o755)
        # The shipped file first, so the test also proves it parses; then the test's values.
        made.file(
            CONF_D / name,
            (OPENRC_DIR / confd).read_text()
            + "\n# test settings\n"
            + "".join(shell_assign(k, v) for k, v in extra.items()),
        )
        try:
            yield name
        finally:
            try:
                # Harmless when it is already stopped; stops what a failed test left running.
                rc(name, "stop")
            finally:
                # Only the PIDs this service recorded; the supervisor first, so it cannot
                # respawn the child in between.
                for pid in (supervisor_pid(name), child_pid(name)):
                    if pid is not None and alive(pid):
                        os.kill(pid, signal.SIGKILL)
                # Forget any state (started/failed) OpenRC keeps for the name before it goes.
                rc(name, "zap")


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


# --- smechvisord ---------------------------------------------------------------------------


@pytest.fixture
def daemon_settings(tmp_path: Path) -> Iterator[dict[str, str]]:
    entry = Path(sys.executable).parent / "smechvisord"
    if not entry.exists():
        pytest.skip(f"{entry} is missing: install the project into the venv (make venv)")
    # AF_UNIX paths are limited to 108 bytes and pytest's tmp paths are long.
    run_dir = Path(tempfile.mkdtemp(prefix="svrc", dir="/tmp"))
    yield {
        "SMECHVISORD_BIN": str(entry),
        "SMECHVISORD_LOG": str(tmp_path / "smechvisord.log"),
        "SMECHVISORD_BIND": f"127.0.0.1:{free_port()}",
        "SMECHVISORD_STATE_DIR": str(tmp_path / "state"),
        "SMECHVISORD_RUN_DIR": str(run_dir),
        "SMECHVISORD_TOKEN_FILE": str(tmp_path / "etc" / "token"),
        "SMECHVISORD_TLS_CERT": str(tmp_path / "etc" / "tls.crt"),
        "SMECHVISORD_TLS_KEY": str(tmp_path / "etc" / "tls.key"),
        "SMECHVISORD_SYSROOT": str(sysroots.build("intel-ready", tmp_path / "sysroot")),
    }
    shutil.rmtree(run_dir, ignore_errors=True)


def parent_of(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^PPid:\s*(\d+)$", status, re.MULTILINE)
    return int(match.group(1)) if match else None


def daemon_pid(name: str, port: int, supervisor: int, log: Path) -> int:
    """The PID of the daemon supervise-daemon runs, once it serves.

    supervise-daemon's forked child writes child_pid itself *before* it execs the daemon
    (OpenRC's child_process()), so a PID read from there can still be a copy of
    supervise-daemon (cmdline `supervise-daemon <service> ...`). The daemon's own answer
    on /api/health is the proof that the exec happened: its PID must be the recorded child
    and a child of the supervisor.
    """
    wait_for("/api/health", lambda: (health(port) or {}).get("status") == "ok", timeout=60)
    served = health(port) or {}
    pid = served.get("pid")
    assert isinstance(pid, int) and alive(pid), f"health names no live PID: {served}"
    assert child_pid(name) == pid, f"supervise-daemon recorded {child_pid(name)}, serving {pid}"
    assert parent_of(pid) == supervisor, f"{pid} is not supervised:\n{log.read_text()}"
    return pid


@pytest.mark.root
def test_smechvisord_start_status_stop(openrc: None, daemon_settings: dict[str, str]) -> None:
    port = int(daemon_settings["SMECHVISORD_BIND"].rpartition(":")[2])
    log = Path(daemon_settings["SMECHVISORD_LOG"])
    with installed_service("smechvisord", "smechvisord.confd", daemon_settings) as name:
        rc_ok(name, "start", log=log)
        supervisor = supervisor_pid(name)
        assert supervisor is not None and alive(supervisor), "no supervisor behind the pidfile"
        pid = daemon_pid(name, port, supervisor, log)
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1] == (
            daemon_settings["SMECHVISORD_BIN"].encode()
        )
        assert rc(name, "status").returncode == 0

        # The conf.d values reached the daemon through the script's exports, and only
        # those: an unset setting stays unset so the daemon applies its own default.
        env = environ_of(pid)
        for key in ("SMECHVISORD_BIND", "SMECHVISORD_STATE_DIR", "SMECHVISORD_SYSROOT"):
            assert env.get(key) == daemon_settings[key]
        assert "SMECHVISORD_CH_BIN" not in env
        assert "SMECHVISORD_BIN" not in env
        assert f"listening on http://127.0.0.1:{port}" in log.read_text()
        assert stat.S_IMODE(log.stat().st_mode) == 0o640

        rc_ok(name, "stop", log=log)
        wait_for("the daemon to exit", gone(pid), timeout=10)
        wait_for("the supervisor to exit", gone(supervisor), timeout=10)
        assert not port_open(port), "the port still accepts connections after stop"
        assert "stopping; VMs keep running" in log.read_text(), "not a clean SIGTERM stop"
        assert rc(name, "status").returncode == 3  # openrc-run: 3 = stopped


@pytest.mark.root
def test_smechvisord_refuses_to_start_without_the_binary(
    openrc: None, daemon_settings: dict[str, str], tmp_path: Path
) -> None:
    settings = {**daemon_settings, "SMECHVISORD_BIN": str(tmp_path / "no-release" / "smechvisord")}
    with installed_service("smechvisord", "smechvisord.confd", settings) as name:
        result = rc(name, "start")
        assert result.returncode != 0
        assert "is not an executable file" in result.stdout + result.stderr
        assert "SMECHVISORD_BIN" in result.stdout + result.stderr
        assert supervisor_pid(name) is None


# --- vhost-user-gpu ------------------------------------------------------------------------

# Behaves like QEMU's contrib/vhost-user-gpu on the points the service relies on: binds
# --socket-path (replacing a stale socket), accepts ONE connection, closes its listening
# socket (the file stays), serves until the VM side disconnects, then exits 0.
GPU_STANDIN = """\
import os, socket, sys
args = dict(a.split("=", 1) for a in sys.argv[1:])
path = args["--socket-path"]
with open(args["--pid-log"], "a") as f:
    f.write(f"{os.getpid()}\\n")
if os.path.exists(path):
    os.unlink(path)
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(1)
conn, _ = listener.accept()
listener.close()
while conn.recv(4096):
    pass
"""


def gpu_connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        return None
    return s


@pytest.mark.root
def test_vhost_user_gpu_serves_respawns_and_stops(openrc: None, tmp_path: Path) -> None:
    standin = tmp_path / "vhost-user-gpu"
    standin.write_text(f"#!{sys.executable}\n{GPU_STANDIN}")
    standin.chmod(0o755)
    sock_dir = Path(tempfile.mkdtemp(prefix="vugpu", dir="/tmp"))
    sock = sock_dir / "sub" / "gpu.sock"  # the script creates the directory
    pids_log = tmp_path / "pids"
    log = tmp_path / "vhost-user-gpu.log"
    settings = {
        "VHOST_USER_GPU_BIN": str(standin),
        "VHOST_USER_GPU_SOCKET": str(sock),
        "VHOST_USER_GPU_ARGS": f"--pid-log={pids_log}",
        "VHOST_USER_GPU_LOG": str(log),
        "respawn_delay": "1",
    }

    def pids() -> list[int]:
        return [int(p) for p in pids_log.read_text().split()] if pids_log.exists() else []

    try:
        with installed_service("vhost-user-gpu", "vhost-user-gpu.confd", settings) as name:
            # A stale socket from a killed backend must not stop the start.
            sock.parent.mkdir()
            stale = socket.socket(socket.AF_UNIX)
            stale.bind(str(sock))
            stale.close()

            rc_ok(name, "start", log=log)
            # start_post waited for the socket: a VM can connect the moment start returns.
            assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o750
            vm = gpu_connect(sock)
            assert vm is not None, "the backend does not accept a connection after start"
            assert rc(name, "status").returncode == 0
            assert len(pids()) == 1

            # The VM goes away: the backend exits, and the supervisor starts a fresh one.
            vm.close()
            wait_for("a respawned backend", lambda: len(pids()) == 2, timeout=20)
            wait_for("the new backend to listen", lambda: bool(gpu_connect(sock)), timeout=10)
            assert not alive(pids()[0])
            assert rc(name, "status").returncode == 0

            rc_ok(name, "stop", log=log)
            for pid in pids():
                wait_for(f"backend {pid} to exit", gone(pid), timeout=10)
            assert not sock.exists(), "stop leaves no socket behind"
            assert rc(name, "status").returncode == 3
    finally:
        for pid in pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(sock_dir, ignore_errors=True)
