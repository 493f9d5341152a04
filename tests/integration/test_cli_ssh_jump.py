"""`ProxyJump` in ~/.ssh/config, as docs/cli.md promises: the node is reached through the
jump host, never directly. Real OpenSSH sshd on 127.0.0.1 serves as both the jump host and
the node (its log shows a login for each hop)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spk_visor.cli import main
from tests.support.daemon import Daemon, DaemonEnv
from tests.support.sshd import Sshd, admin_home, free_port


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sshd: Sshd) -> Path:
    home = admin_home(tmp_path, monkeypatch)
    (home / ".ssh" / "known_hosts").write_text(f"{sshd.known_hosts_name} {sshd.host_pub}\n")
    return home


def ssh_config(home: Path, sshd: Sshd, jump: str) -> None:
    (home / ".ssh" / "config").write_text(
        "Host node\n"
        "    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        "    User root\n"
        f"    IdentityFile {sshd.user_key}\n"
        f"    ProxyJump {jump}\n"
        "Host bastion\n"
        "    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        "    User root\n"
        f"    IdentityFile {sshd.user_key}\n"
    )


def logins(sshd: Sshd) -> int:
    return len(re.findall(r"Accepted publickey for root from 127\.0\.0\.1", sshd.log_text()))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_node_is_reached_through_the_jump_host(
    home: Path, sshd: Sshd, daemon: Daemon, daemon_env: DaemonEnv,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ssh_config(home, sshd, "bastion")
    before = logins(sshd)
    code, out, err = run(
        capsys, "--ssh", "node", "--daemon-port", str(daemon.port),
        "--token", daemon.token, "--json", "node",
    )  # fmt: skip
    assert code == 0, err
    assert "cpu_model" in json.loads(out)
    assert logins(sshd) - before == 2, "one login on the jump host, one on the node"


def test_a_dead_jump_host_is_not_bypassed(
    home: Path, sshd: Sshd, daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """ProxyJump was ignored: the CLI connected to the node directly, past the bastion."""
    port = free_port()
    ssh_config(home, sshd, f"root@127.0.0.1:{port}")
    before = logins(sshd)
    code, _, err = run(
        capsys, "--ssh", "node", "--daemon-port", str(daemon.port), "--token", daemon.token,
        "node",
    )  # fmt: skip
    assert code == 7, err
    assert f"127.0.0.1:{port}" in err, err
    assert logins(sshd) == before, "the node was reached without its jump host"


def test_proxycommand_is_refused_by_name(
    home: Path, sshd: Sshd, capsys: pytest.CaptureFixture[str]
) -> None:
    ssh_config(home, sshd, "bastion")
    config = home / ".ssh" / "config"
    config.write_text(config.read_text().replace("ProxyJump bastion", "ProxyCommand nc %h %p"))
    code, _, err = run(capsys, "--ssh", "node", "--token", "t" * 20, "node")
    assert code == 2, err
    assert "ProxyCommand" in err and "ProxyJump" in err, err
