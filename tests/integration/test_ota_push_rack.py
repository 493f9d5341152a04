"""`ota push` to a rack: ten real OpenSSH sshd instances on 127.0.0.1, each a "node" whose
`spk-visor` is tests/support/bin/fake-ota-node (it reads the whole bundle, refuses one cut
short, reports like the real command, and fails health when told to). The canary applies
first and alone while the next nodes are sent the bundle but its last byte; then at most
five apply at once. A node that fails health and rolls back stops what has not started
under --stop-on-failure (a bundle sent ahead is cut short, and the node applies none of
it), and is reported while the rest proceed without it. Wall time against one node is
measured in bench/ota_push_rack.py, not here."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.config import SshSpec
from spk_visor.errors import ExitCode
from spk_visor.ota.push import PushResult, PushTarget, overall_exit, push
from spk_visor.transport import ssh
from tests.integration.test_ota_push_stream import FAKE_NODE, max_overlap
from tests.support.fake_bundle import write as random_file
from tests.support.sshd import Sshd, start_sshd

RACK = 10
PARALLEL = 5
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def rack() -> Iterator[list[Sshd]]:
    started: list[Sshd] = []
    try:
        for _ in range(RACK):
            started.append(start_sshd())
        yield started
    finally:
        ssh.close_all()
        for server in started:
            server.stop()


class Rack:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, servers: list[Sshd]):
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
        (home / ".ssh" / "config").write_text(
            "".join(
                f"Host rack{i}\n    HostName 127.0.0.1\n    Port {s.port}\n"
                f"    User root\n    IdentityFile {s.user_key}\n"
                for i, s in enumerate(servers)
            )
        )
        (home / ".ssh" / "known_hosts").write_text(
            "".join(f"{s.known_hosts_name} {s.host_pub}\n" for s in servers)
        )
        self.root = tmp_path / "nodes"
        self.dirs = []
        for s in servers:
            d = self.root / str(s.port)
            d.mkdir(parents=True)
            self.dirs.append(d)
        self.targets = [PushTarget(f"rack{i}", SshSpec(f"rack{i}")) for i in range(RACK)]
        self.bundle = tmp_path / "spk-2.6.0.spkb"
        self.sha256 = random_file(self.bundle, 2 << 20)

    def behave(self, i: int, **conf: Any) -> None:
        (self.dirs[i] / "node.json").write_text(json.dumps(conf))

    def push(self, **kw: Any) -> list[PushResult]:
        return push(
            self.bundle,
            self.targets,
            remote_command=(sys.executable, str(FAKE_NODE), "--root", str(self.root)),
            timeout=TIMEOUT,
            accept_new=False,
            parallel=PARALLEL,
            **kw,
        )

    def touched(self, i: int) -> bool:
        return (self.dirs[i] / "log.jsonl").exists()

    def log(self, i: int) -> list[dict[str, Any]]:
        lines = (self.dirs[i] / "log.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    def span(self, i: int) -> tuple[float, float]:
        times = [e["t"] for e in self.log(i)]
        return min(times), max(times)

    def applied(self, i: int) -> bool:
        return self.touched(i) and any(e["what"] == "applying" for e in self.log(i))

    def applying(self, i: int) -> tuple[float, float]:
        """From when node i had the whole bundle to its last command's end."""
        (start,) = [e["t"] for e in self.log(i) if e["what"] == "applying"]
        return start, self.span(i)[1]

    def received(self, i: int) -> str:
        return str(json.loads((self.dirs[i] / "received.json").read_text())["sha256"])


@pytest.fixture
def nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rack: list[Sshd]) -> Iterator[Rack]:
    r = Rack(tmp_path, monkeypatch, rack)
    yield r
    ssh.close_all()


def test_canary_then_five_at_a_time_and_everyone_gets_it(nodes: Rack) -> None:
    for i in range(RACK):
        nodes.behave(i, apply_delay=0.3)
    # Long enough that the next nodes' spk-visor surely started (an sshd session and a
    # Python start on a loaded machine) before the canary is done.
    nodes.behave(0, apply_delay=2.0)
    results = nodes.push()
    assert [r.exit_code for r in results] == [0] * RACK
    assert all(nodes.received(i) == nodes.sha256 for i in range(RACK))
    canary_done = nodes.span(0)[1]
    applying = [nodes.applying(i) for i in range(1, RACK)]
    assert all(canary_done < start for start, _ in applying)  # the canary alone, first
    # While it applied, the next nodes were sent the bundle (all of it but the last byte).
    assert nodes.span(1)[0] < canary_done
    assert 1 < max_overlap(applying) <= PARALLEL
    assert overall_exit(results) == ExitCode.OK


def test_a_rolled_back_node_with_stop_on_failure_leaves_the_rest_untouched(nodes: Rack) -> None:
    # rack1 applies with four others after the canary and fails at once, while those four
    # are still busy for a second: no slot is free to start a sixth before the failure.
    for i in range(RACK):
        nodes.behave(i, apply_delay=1.0)
    nodes.behave(1, status_exit=5, phase="rolled_back", message="health check failed")
    results = nodes.push(stop_on_failure=True)
    by = {r.node: r for r in results}
    assert (by["rack1"].exit_code, by["rack1"].phase) == (5, "rolled_back")
    assert by["rack1"].message == "health check failed"
    skipped = [r.node for r in results if r.phase == "skipped"]
    assert skipped == [f"rack{i}" for i in range(PARALLEL + 1, RACK)], results
    for r in results:
        i = int(r.node.removeprefix("rack"))
        if r.phase == "skipped":
            assert r.exit_code == ExitCode.NOT_ELIGIBLE
            assert "--stop-on-failure" in r.message
            # Never contacted, or sent all of the bundle but its last byte, and then cut:
            # the node refused it (a real node keeps nothing: test_ota_tamper's
            # "truncated", test_ota_apply_e2e's push) and applied none of it.
            assert not nodes.applied(i)
            if nodes.touched(i):
                assert json.loads((nodes.dirs[i] / "received.json").read_text())["cut"]
        elif r.node != "rack1":
            assert r.exit_code == 0 and nodes.received(i) == nodes.sha256
    # The four after the first five were sent the bundle while those applied.
    assert all(nodes.touched(i) for i in range(PARALLEL + 1, RACK))
    assert overall_exit(results) == ExitCode.ROLLED_BACK


def test_a_rolled_back_node_without_stop_on_failure_is_reported_and_the_rest_proceed(
    nodes: Rack,
) -> None:
    nodes.behave(3, status_exit=5, phase="rolled_back", message="health check failed")
    results = nodes.push()
    assert [r.exit_code for r in results] == [0, 0, 0, 5, 0, 0, 0, 0, 0, 0]
    assert all(nodes.received(i) == nodes.sha256 for i in range(RACK))
    assert overall_exit(results) == ExitCode.ROLLED_BACK
