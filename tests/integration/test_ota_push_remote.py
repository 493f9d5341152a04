"""Which `spk-visor` `ota push` runs on a node, against a real sshd on 127.0.0.1.

sshd runs a command with the login's non-login PATH, which may not hold spk-visor: the
push then died with the shell's exit 127 (reported as an internal error). Now, unless
told (--remote-command, or remote_command for the node in config.toml), the push looks
for it on the PATH and then at the well-known places an install puts it, and says what
to set when it finds none (exit 2).
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.config import SshSpec
from spk_visor.errors import ExitCode
from spk_visor.ota import push as push_mod
from spk_visor.ota.push import PushResult, PushTarget, push
from spk_visor.transport import ssh
from tests.support import cli, fake_bundle
from tests.support.sshd import Sshd, start_sshd

FAKE_NODE = Path(__file__).resolve().parents[1] / "support" / "bin" / "fake-ota-node"
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def server() -> Iterator[Sshd]:
    started = start_sshd()
    try:
        yield started
    finally:
        ssh.close_all()
        started.stop()


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Sshd) -> Path:
    """~/.ssh for host alias `node0`; the fake node's directory; no spk-visor on its PATH
    (a name nobody has) and only temporary well-known places."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".ssh" / "config").write_text(
        f"Host node0\n    HostName 127.0.0.1\n    Port {server.port}\n"
        f"    User root\n    IdentityFile {server.user_key}\n"
    )
    (home / ".ssh" / "known_hosts").write_text(f"{server.known_hosts_name} {server.host_pub}\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setattr(push_mod, "REMOTE_NAME", f"spk-visor-absent-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(
        push_mod,
        "REMOTE_PLACES",
        (
            str(tmp_path / "usr-bin" / "spk-visor"),
            str(tmp_path / "opt" / "bin" / "spk-visor"),
        ),
    )
    root = tmp_path / "nodes"
    (root / str(server.port)).mkdir(parents=True)
    fake_bundle.write(tmp_path / "spk.spkb", 4096)
    return root


def install_at(path: Path, root: Path) -> Path:
    """An executable spk-visor at `path` that is the fake node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_NODE} --root {root} "$@"\n')
    path.chmod(0o755)
    return path


def commands_run(root: Path, server: Sshd) -> list[str]:
    log = root / str(server.port) / "log.jsonl"
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e["cmd"] for e in entries if e["what"] == "start"]


def push_node0(tmp_path: Path, **kw: Any) -> PushResult:
    [result] = push(
        tmp_path / "spk.spkb",
        [PushTarget("node0", SshSpec("node0"))],
        timeout=TIMEOUT,
        accept_new=False,
        **kw,
    )
    return result


def test_not_found_anywhere_names_the_setting(node: Path, tmp_path: Path) -> None:
    result = push_node0(tmp_path)
    assert result.exit_code == ExitCode.USAGE, result
    assert "spk-visor" in result.message and "not found" in result.message, result.message
    assert "remote_command" in result.message and "--remote-command" in result.message
    assert str(tmp_path / "opt" / "bin" / "spk-visor") in result.message  # what was tried


def test_found_at_a_well_known_place(node: Path, tmp_path: Path, server: Sshd) -> None:
    """Not on the PATH, but where an install puts it: found and used for every step."""
    install_at(tmp_path / "opt" / "bin" / "spk-visor", node)
    result = push_node0(tmp_path)
    assert result.exit_code == ExitCode.OK, result
    assert commands_run(node, server) == ["apply"]


def test_an_explicit_command_that_is_missing(node: Path, tmp_path: Path) -> None:
    """Told where it is, and it is not there: the same exit 2, naming the flag."""
    install_at(tmp_path / "opt" / "bin" / "spk-visor", node)  # never looked for
    result = push_node0(tmp_path, remote_command=[str(tmp_path / "elsewhere" / "spk-visor")])
    assert result.exit_code == ExitCode.USAGE, result
    assert "--remote-command" in result.message and "elsewhere" in result.message


def test_cli_flag_and_config_file_setting(node: Path, tmp_path: Path, server: Sshd) -> None:
    wrapper = install_at(tmp_path / "custom" / "spk-visor", node)
    bundle = str(tmp_path / "spk.spkb")
    res = cli.run("--ssh", "node0", "ota", "push", bundle)
    assert res.code == ExitCode.USAGE and "remote_command" in res.out + res.err, res
    res = cli.run("--ssh", "node0", "ota", "push", bundle, "--remote-command", str(wrapper))
    assert res.code == 0, res
    config = tmp_path / "config.toml"
    config.write_text(f'[nodes.n1]\nssh = "node0"\nremote_command = "{wrapper}"\n')
    res = cli.run("--node", "n1", "ota", "push", bundle, env={"SPK_VISOR_CONFIG": str(config)})
    assert res.code == 0, res
    assert commands_run(node, server).count("apply") == 2


def test_a_command_with_broken_quoting_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[nodes.n1]\nssh = "node0"\nremote_command = "\'/opt/x"\n')
    res = cli.run(
        "--node",
        "n1",
        "ota",
        "push",
        str(tmp_path / "b.spkb"),
        env={"SPK_VISOR_CONFIG": str(config)},
    )
    assert res.code == ExitCode.USAGE and "remote_command" in res.err, res
    res = cli.run(
        "--ssh", "node0", "ota", "push", str(tmp_path / "b.spkb"), "--remote-command", "'x"
    )
    assert res.code == ExitCode.USAGE and "--remote-command" in res.err, res
