"""`--inventory` against a real sshd: an Ansible inventory names the fleet, and its host
variables (ansible_host, ansible_port, ansible_user) are how each node is reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spk_visor.cli import main
from tests.support.daemon import Daemon, DaemonEnv
from tests.support.sshd import Sshd, admin_home, free_port


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sshd: Sshd) -> Path:
    home = admin_home(tmp_path, monkeypatch)
    # The inventory names no key; ssh_config supplies it for the address, as it would for
    # an admin whose inventory says only where the hosts are.
    (home / ".ssh" / "config").write_text(f"Host 127.0.0.1\n    IdentityFile {sshd.user_key}\n")
    return home


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_fleet_from_ini_inventory_over_ssh(
    tmp_path: Path,
    home: Path,
    sshd: Sshd,
    daemon: Daemon,
    daemon_env: DaemonEnv,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(
        "[rack1]\n"
        "n1 ansible_host=127.0.0.1\n"
        "n2 ansible_host=127.0.0.1\n"
        f"n3 ansible_host=127.0.0.1 spk_visor_daemon_port={free_port()}\n"
        "[rack2]\n"
        "other ansible_host=127.0.0.1\n"
        "[racks:children]\n"
        "rack1\n"
        "rack2\n"
        "[racks:vars]\n"
        f"ansible_port={sshd.port}\n"
        "ansible_user=root\n"
        f"spk_visor_daemon_port={daemon.port}\n"
        f"spk_visor_token_file={daemon_env.token_file}\n"
    )
    code, out, err = _run(
        capsys, "--inventory", str(inventory), "--accept-new", "--fleet", "rack1", "--json", "node"
    )
    doc = json.loads(out)
    # rack1 only: `other` is in rack2.
    assert sorted(doc) == ["n1", "n2", "n3"], out
    assert "cpu_model" in doc["n1"] and "cpu_model" in doc["n2"], out
    # n3's daemon port is its own host variable, which beats the group's: nothing listens.
    assert "error" in doc["n3"], out
    assert code == 7, (code, err)


def test_node_name_from_yaml_inventory(
    tmp_path: Path,
    home: Path,
    sshd: Sshd,
    daemon: Daemon,
    daemon_env: DaemonEnv,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "all:\n"
        "  vars:\n"
        "    ansible_user: root\n"
        "  children:\n"
        "    rack1:\n"
        "      hosts:\n"
        f"        node-a:\n"
        f"          ansible_host: 127.0.0.1\n"
        f"          ansible_port: {sshd.port}\n"
        f"          spk_visor_daemon_port: {daemon.port}\n"
        f"          spk_visor_token_file: {daemon_env.token_file}\n"
    )
    code, out, err = _run(
        capsys, "-i", str(inventory), "--accept-new", "--node", "node-a", "--json", "node"
    )
    assert code == 0, err
    assert "cpu_cores" in json.loads(out)
    code, out, err = _run(capsys, "-i", str(inventory), "--fleet", "rack9", "node")
    assert code == 2
    assert "no group 'rack9'" in err and "rack1" in err
