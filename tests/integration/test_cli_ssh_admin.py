"""`spk-visor --ssh admin@node1` as the README writes it, by a non-root admin, against a
real OpenSSH sshd and the real daemon (run as root) on 127.0.0.1.

The admin is authorised by the token group: the daemon creates its token 0640
root:GROUP, so a member reads it over SFTP and nobody else can. The accounts (an admin in
the group, an outsider) are real, made by the test and removed after it. sshd chroots
both to a directory of the test's, so that the node's /etc/smechvisord/token, the path
the CLI reads by default, is the test daemon's token and not this machine's.
"""

from __future__ import annotations

import grp
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spk_visor.cli import main
from spk_visor.transport import ssh
from tests.support.daemon import Daemon, DaemonEnv
from tests.support.prereq import need_command, need_root
from tests.support.sshd import Sshd, start_sshd

Run = Callable[..., tuple[int, str, str]]


@dataclass(frozen=True)
class Accounts:
    group: str
    admin: str  # a member of the token group
    outsider: str  # not a member


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture
def accounts() -> Iterator[Accounts]:
    need_root()
    for command in ("useradd", "usermod", "userdel", "groupadd", "groupdel"):
        need_command(command, "passwd")
    suffix = secrets.token_hex(3)
    names = Accounts(f"svtok{suffix}", f"svadm{suffix}", f"svout{suffix}")
    made: list[tuple[str, str]] = []
    try:
        _run("groupadd", names.group)
        made.append(("groupdel", names.group))
        for user, groups in ((names.admin, ["-G", names.group]), (names.outsider, [])):
            _run("useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", *groups, user)
            made.append(("userdel", user))
            # Unlocked for key logins: sshd without PAM refuses a '!' (locked) account.
            _run("usermod", "-p", "*", user)
        yield names
    finally:
        for command, name in reversed(made):
            subprocess.run([command, name], capture_output=True, timeout=60, check=False)


@pytest.fixture
def chroot() -> Iterator[Path]:
    # sshd accepts a chroot only on a path of root-owned, not group- or world-writable
    # directories: /tmp is world-writable, /run is not.
    root = Path(tempfile.mkdtemp(prefix="svchroot-", dir="/run"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sshd(accounts: Accounts, chroot: Path) -> Iterator[Sshd]:
    server = start_sshd(
        extra_config=f"Match User {accounts.admin},{accounts.outsider}\n"
        f"    ChrootDirectory {chroot}\n"
    )
    yield server
    ssh.close_all()
    server.stop()


@pytest.fixture
def node(tmp_path: Path, accounts: Accounts, chroot: Path) -> Iterator[Daemon]:
    env = DaemonEnv(tmp_path / "d", extra_env={"SMECHVISORD_TOKEN_GROUP": accounts.group})
    env.token_file = chroot / "etc" / "smechvisord" / "token"
    daemon = Daemon(env)
    try:
        yield daemon
    finally:
        daemon.stop()
        env.cleanup()


@pytest.fixture
def run(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sshd: Sshd,
) -> Run:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".ssh" / "config").write_text(
        f"Host node1\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
        f"Host *\n    IdentityFile {sshd.user_key}\n"
    )
    (home / ".ssh" / "known_hosts").write_text(f"{sshd.known_hosts_name} {sshd.host_pub}\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SPK_VISOR_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    for name in [k for k in os.environ if k.startswith("SPK_VISOR_") and k != "SPK_VISOR_CONFIG"]:
        monkeypatch.delenv(name)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def logins(sshd: Sshd) -> list[str]:
    return re.findall(r"Accepted publickey for (\S+) from 127\.0\.0\.1", sshd.log_text())


def test_the_daemon_shares_its_token_with_the_token_group_only(
    node: Daemon, accounts: Accounts
) -> None:
    token = node.env.token_file.stat()
    assert stat.S_IMODE(token.st_mode) == 0o640
    assert (token.st_uid, token.st_gid) == (0, grp.getgrnam(accounts.group).gr_gid)
    folder = node.env.token_file.parent.stat()
    # Members may pass through to the token; nobody may list the folder.
    assert stat.S_IMODE(folder.st_mode) == 0o710
    assert folder.st_gid == token.st_gid


def test_a_non_root_admin_in_the_group_uses_the_readme_form(
    run: Run, sshd: Sshd, node: Daemon, accounts: Accounts
) -> None:
    code, out, err = run(
        "--ssh", f"{accounts.admin}@node1", "--daemon-port", str(node.port), "--json", "node"
    )

    assert code == 0, err
    assert json.loads(out)["hostname"] == node.get("/api/node").json["hostname"]
    # The admin logged in (not root), and the token came from the node over SFTP.
    assert logins(sshd) == [accounts.admin]


def test_an_admin_outside_the_group_is_refused_and_told_how_to_join(
    run: Run, sshd: Sshd, node: Daemon, accounts: Accounts
) -> None:
    code, out, err = run(
        "--ssh", f"{accounts.outsider}@node1", "--daemon-port", str(node.port), "node"
    )

    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == (
        f"spk-visor: error: ssh://{accounts.outsider}@127.0.0.1:{sshd.port}: cannot read the "
        "node's token "
        f"/etc/smechvisord/token: permission denied for SSH user {accounts.outsider}"
    )
    assert lines[1] == (
        f"join the node's token group (as root on the node: usermod -aG smechvisor "
        f"{accounts.outsider}; the group is the daemon's SMECHVISORD_TOKEN_GROUP), log in "
        "as root, or pass --token / SPK_VISOR_TOKEN"
    )
    assert logins(sshd) == [accounts.outsider]
    # Nothing was loosened on the way.
    assert stat.S_IMODE(node.env.token_file.stat().st_mode) == 0o640


def test_the_ssh_port_and_the_daemon_port_are_told_apart(
    run: Run, sshd: Sshd, node: Daemon, accounts: Accounts
) -> None:
    """`user@host:PORT` is the SSH server's port (as for ssh -p); the daemon's is
    --daemon-port. Here the host is given by address, with the SSH port inline."""
    code, out, err = run(
        "--ssh",
        f"{accounts.admin}@127.0.0.1:{sshd.port}",
        "--daemon-port",
        str(node.port),
        "--json",
        "node",
    )
    assert code == 0, err
    assert json.loads(out)["hostname"] == node.get("/api/node").json["hostname"]
