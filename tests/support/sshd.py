"""A real OpenSSH sshd on 127.0.0.1 for SSH integration tests (EXAMPLES.md G.32).

Everything it uses lives in one temp dir: a throwaway ed25519 host key, an authorized user
key, the config, the pid file and the log. It runs as root (sshd needs to), in the
foreground (-D), logging to a file (-e), and is stopped by its PID along with the
per-connection children it forked.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.hostpaths import SharedDir
from tests.support.prereq import need_command, need_root

# sshd's privilege-separation directory; Debian's init script creates it at boot, so a
# machine where sshd never ran as a service lacks it. Shared by every sshd a test runs.
PRIVSEP_DIR = SharedDir(Path("/run/sshd"))

CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/ssh_host_ed25519_key
AuthorizedKeysFile {dir}/authorized_keys
PubkeyAuthentication yes
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
Subsystem sftp internal-sftp
PidFile {dir}/sshd.pid
LogLevel VERBOSE
"""


def keygen(path: Path, passphrase: str = "") -> Path:
    """A new ed25519 key pair at `path` (and `path`.pub); returns `path`."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    return path


def fingerprint(pub: Path) -> str:
    """OpenSSH's own SHA256 fingerprint of a public key file (independent of our code)."""
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]  # "256 SHA256:... comment (ED25519)"


def admin_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME with an empty ~/.ssh (0700), no agent and no spk-visor settings from
    the environment, as an admin's first SSH session from a clean workstation."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    # Agent-less: only the IdentityFile from ~/.ssh/config can log in.
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    for name in ("SPK_VISOR_TOKEN", "SPK_VISOR_NODE", "SPK_VISOR_SSH", "SPK_VISOR_FLEET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPK_VISOR_CONFIG", str(tmp_path / "absent.toml"))
    return home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        # The ppid is the 2nd field after the ")" that ends the command name.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(name))
    return found


@dataclass
class Sshd:
    dir: Path
    port: int
    host_key: Path
    user_key: Path
    log: Path
    proc: subprocess.Popen[bytes]
    _stopped: bool = field(default=False)

    @property
    def host_pub(self) -> str:
        """The host key's known_hosts form: "ssh-ed25519 AAAA..."."""
        kind, blob = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"{kind} {blob}"

    @property
    def host_fingerprint(self) -> str:
        return fingerprint(Path(f"{self.host_key}.pub"))

    @property
    def known_hosts_name(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the listener and its per-connection children, by PID."""
        if self._stopped:
            return
        self._stopped = True
        victims = [self.proc.pid, *_children(self.proc.pid)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        for pid in victims[1:]:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if Path(f"/proc/{pid}").exists():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)
        PRIVSEP_DIR.release()


def start_sshd(timeout: float = 15, extra_config: str = "") -> Sshd:
    """Start sshd on a free loopback port; skips (a failure under CI=true) when it cannot.

    The temp dir is under /tmp and world-readable (not pytest's 0700 tmp_path) so that
    sshd can read the authorized keys as a non-root login user too. `extra_config` goes
    at the end of sshd_config (where Match blocks must be).
    """
    need_root()
    sshd = need_command("sshd", "openssh-server")
    need_command("ssh-keygen", "openssh-client")
    PRIVSEP_DIR.acquire()
    workdir = Path(tempfile.mkdtemp(prefix="sshd-", dir="/tmp"))
    workdir.chmod(0o755)
    host_key = keygen(workdir / "ssh_host_ed25519_key")
    user_key = keygen(workdir / "id_ed25519")
    (workdir / "authorized_keys").write_text(Path(f"{user_key}.pub").read_text())
    (workdir / "authorized_keys").chmod(0o644)
    log = workdir / "sshd.log"
    last = ""
    # A free port can be taken between our probe and sshd's bind: try a few.
    for _ in range(3):
        port = free_port()
        conf = workdir / "sshd_config"
        conf.write_text(CONFIG.format(port=port, dir=workdir) + extra_config)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = Sshd(workdir, port, host_key, user_key, log, proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return server
            except OSError:
                time.sleep(0.05)
        last = log.read_text(errors="replace")
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
    shutil.rmtree(workdir, ignore_errors=True)
    PRIVSEP_DIR.release()
    raise RuntimeError(f"sshd did not start:\n{last}")
