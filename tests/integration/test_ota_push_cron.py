"""`ota push` to a fleet as an admin's script or cron job runs it: no terminal, `-q`,
`--json`, some nodes failing, over a real sshd on 127.0.0.1.

The rack: `ok` applies; `dead` has no sshd (connection refused); `stranger` logs in as a
user that does not exist (login refused); `refuser` refuses the bundle (exit 3). Each
failure must reach stderr as one line naming the node and what to do (the push kept only
the message and dropped the hint), `-q` must print nothing else, `--json` only JSON on
stdout with the hint in each node's entry, and the exit code is the first failure's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from spk_visor.errors import ExitCode
from tests.support import cli, fake_bundle
from tests.support.sshd import Sshd, free_port

FAKE_NODE = Path(__file__).resolve().parents[1] / "support" / "bin" / "fake-ota-node"
RACK = ("ok", "dead", "stranger", "refuser")
FAILED = ("dead", "stranger", "refuser")
# What each failed node's line must say to do, besides naming it.
NEXT_STEP = {"dead": "sshd", "stranger": "authorized_keys", "refuser": "ota verify"}


@pytest.fixture
def rack(tmp_path: Path, sshd: Sshd) -> dict[str, str]:
    """HOME with ~/.ssh for the rack, config.toml with its group; the env for cli.run."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    users = {"ok": "root", "stranger": "no-such-user-here", "refuser": "root"}
    ssh_config = "".join(
        f"Host {name}\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
        f"    User {user}\n    IdentityFile {sshd.user_key}\n"
        for name, user in users.items()
    )
    ssh_config += f"Host dead\n    HostName 127.0.0.1\n    Port {free_port()}\n    User root\n"
    (home / ".ssh" / "config").write_text(ssh_config)
    (home / ".ssh" / "known_hosts").write_text(f"{sshd.known_hosts_name} {sshd.host_pub}\n")
    config = ""
    for name in RACK:
        root = tmp_path / "roots" / name
        (root / str(sshd.port)).mkdir(parents=True)
        wrapper = tmp_path / f"spk-visor-{name}"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_NODE} --root {root} "$@"\n')
        wrapper.chmod(0o755)
        config += f'[nodes.{name}]\nssh = "{name}"\nremote_command = "{wrapper}"\n'
    (tmp_path / "roots" / "refuser" / str(sshd.port) / "node.json").write_text(
        json.dumps({"apply_exit": 3, "message": "manifest signature refused"})
    )
    config += f"[groups]\nrack = {json.dumps(list(RACK))}\n"
    (tmp_path / "config.toml").write_text(config)
    fake_bundle.write(tmp_path / "spk.spkb", 4096)
    return {"HOME": str(home), "SPK_VISOR_CONFIG": str(tmp_path / "config.toml")}


def push(rack: dict[str, str], tmp_path: Path, *args: str) -> cli.Result:
    return cli.run(
        *args[: args.index("ota")], "--fleet", "rack", *args[args.index("ota") :],
        str(tmp_path / "spk.spkb"), env=rack,
    )  # fmt: skip


def one_line_per_failed_node(res: cli.Result) -> None:
    lines = res.err_lines
    assert len(lines) == len(FAILED), res.err
    for name, line in zip(FAILED, lines, strict=True):
        assert line.startswith(f"spk-visor: {name}: "), (name, res.err)
        assert NEXT_STEP[name] in line, (name, line)
        assert "Traceback" not in line and "internal error" not in line


def test_quiet_prints_one_line_per_failed_node_and_nothing_else(
    rack: dict[str, str], tmp_path: Path
) -> None:
    res = push(rack, tmp_path, "ota", "push", "-q")
    assert res.code == ExitCode.TRANSIENT, res  # the first failure's: dead
    assert res.out == "", res.out
    one_line_per_failed_node(res)


def test_json_is_all_of_stdout_with_a_hint_per_failed_node(
    rack: dict[str, str], tmp_path: Path
) -> None:
    for args in (("--json", "ota", "push"), ("ota", "push", "--json", "-q")):
        res = push(rack, tmp_path, *args)
        assert res.code == ExitCode.TRANSIENT, res
        docs = json.loads(res.out)
        assert [d["node"] for d in docs] == list(RACK)
        codes = {d["node"]: d["exit_code"] for d in docs}
        assert codes == {"ok": 0, "dead": 7, "stranger": 2, "refuser": 3}, codes
        for doc in docs:
            if doc["node"] in FAILED:
                assert NEXT_STEP[doc["node"]] in doc["hint"], doc
            else:
                assert doc["hint"] is None, doc
        one_line_per_failed_node(res)


def test_the_table_goes_to_stdout_and_the_failures_to_stderr(
    rack: dict[str, str], tmp_path: Path
) -> None:
    """Without -q, as from a script: the table on stdout (every node), and the same
    lines on stderr as under -q, where a script's log or cron's mail shows them."""
    res = push(rack, tmp_path, "ota", "push")
    assert res.code == ExitCode.TRANSIENT, res
    rows = res.out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == list(RACK), res.out
    one_line_per_failed_node(res)


def test_quiet_success_prints_nothing(rack: dict[str, str], tmp_path: Path) -> None:
    config = Path(rack["SPK_VISOR_CONFIG"])
    config.write_text(config.read_text().replace(json.dumps(list(RACK)), '["ok"]'))
    res = push(rack, tmp_path, "ota", "push", "-q")
    assert (res.code, res.out, res.err) == (0, "", ""), res
