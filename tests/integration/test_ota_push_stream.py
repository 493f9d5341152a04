"""Streaming over SSH for `ota push`, against real OpenSSH sshd instances on 127.0.0.1.

`exec_stream` is checked on its own (data intact, lines while streaming, exit status, an
early exit, quoting, host keys), then `push()` with four "nodes" (four sshd instances)
whose `spk-visor` is tests/support/bin/fake-ota-node: the canary runs alone first, the
fan-out respects --parallel, and failures stop or skip what they should.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.config import Settings, SshSpec, Target
from spk_visor.errors import ExitCode, HostKeyError, TransportError, UsageError
from spk_visor.ota.push import (
    PushResult,
    PushTarget,
    overall_exit,
    push,
    summary_table,
    targets_from_settings,
)
from spk_visor.transport import ssh
from spk_visor.transport.ssh_stream import exec_stream, run
from tests.support.fake_bundle import write as random_file
from tests.support.sshd import Sshd, free_port, start_sshd

FAKE_NODE = Path(__file__).resolve().parents[1] / "support" / "bin" / "fake-ota-node"
NODES = 4
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def servers() -> Iterator[list[Sshd]]:
    started: list[Sshd] = []
    try:
        for _ in range(NODES):
            started.append(start_sshd())
        yield started
    finally:
        ssh.close_all()  # pooled connections first, so sshd's children exit on their own
        for server in started:
            server.stop()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, servers: list[Sshd]) -> Iterator[Path]:
    """~/.ssh with a Host alias per node (node0..node3) and all host keys trusted."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    config = []
    known = []
    for i, server in enumerate(servers):
        config.append(
            f"Host node{i}\n    HostName 127.0.0.1\n    Port {server.port}\n"
            f"    User root\n    IdentityFile {server.user_key}\n"
        )
        known.append(f"{server.known_hosts_name} {server.host_pub}\n")
    (home / ".ssh" / "config").write_text("".join(config))
    (home / ".ssh" / "known_hosts").write_text("".join(known))
    yield home
    ssh.close_all()


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


# ---- exec_stream ----------------------------------------------------------------------


def test_a_bundle_on_stdin_is_read_through_a_1_mib_pipe() -> None:
    """sshd hands a pushed bundle to `ota apply --bundle -` through a pipe; the real CLI
    widens it from Linux's 64 KiB to 1 MiB (a 64 MiB push at load 10: 1.6 s -> 0.6 s)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "spk_visor", "ota", "inspect", "-"],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stderr is not None
    fd = proc.stdin.fileno()
    assert fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) == 64 << 10  # Linux's default
    try:
        proc.stdin.write(b"not a bundle, and more than its magic")
        proc.stdin.flush()
        err = proc.stderr.read()  # until the reader exits, refusing the bad magic
        size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)  # our end keeps the pipe alive
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert b"bad magic" in err, err
    assert size == 1 << 20


def test_64_mib_arrive_intact(home: Path, tmp_path: Path) -> None:
    size = 64 << 20
    src = tmp_path / "src.bin"
    expected = random_file(src, size)
    landed = tmp_path / "landed.bin"
    seen: list[int] = []

    with src.open("rb") as f:
        result = exec_stream(
            SshSpec("node0"),
            sh(f"tee {shlex.quote(str(landed))} | sha256sum"),
            f,
            size=size,
            progress=seen.append,
            timeout=TIMEOUT,
            accept_new=False,
        )

    assert result.exit_status == 0, result.stderr
    assert result.stdout.split()[0].decode() == expected  # what the node read
    assert landed.stat().st_size == size
    assert hashlib.sha256(landed.read_bytes()).hexdigest() == expected  # what it wrote
    assert seen[-1] == size
    assert seen == sorted(seen) and len(seen) >= 64  # reported as it went, per MiB


class GatedSource:
    """A source whose second read waits until the test saw a line from the node: the
    stream cannot finish unless lines are delivered while it is still being sent."""

    def __init__(self, total: int, gate: threading.Event) -> None:
        self.left = total
        self.gate = gate
        self.reads = 0

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        if self.reads == 2 and not self.gate.wait(TIMEOUT):
            raise AssertionError("no stdout line arrived while streaming")
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


def test_stdout_lines_arrive_while_streaming(home: Path) -> None:
    size = 8 << 20
    gate = threading.Event()
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        gate.set()

    # The node reads 1 MiB, reports it at once, then reads the rest.
    script = (
        "import sys; s = sys.stdin.buffer; n = len(s.read(1 << 20)); "
        "print('got', n, flush=True); rest = len(s.read()); print('total', n + rest)"
    )
    result = exec_stream(
        SshSpec("node0"),
        [sys.executable, "-c", script],
        GatedSource(size, gate),  # type: ignore[arg-type]
        size=size,
        timeout=TIMEOUT,
        accept_new=False,
        on_stdout_line=on_line,
    )

    assert result.exit_status == 0, result.stderr
    assert lines == [f"got {1 << 20}", f"total {size}"]
    assert result.stdout == f"got {1 << 20}\ntotal {size}\n".encode()


def test_exit_status_and_stderr_are_returned(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "small"
    src.write_bytes(b"x" * 100_000)
    with src.open("rb") as f:
        result = exec_stream(
            SshSpec("node1"),
            sh('n=$(wc -c); echo "read $n" >&2; exit 42'),
            f,
            size=100_000,
            timeout=TIMEOUT,
            accept_new=False,
        )
    assert result.exit_status == 42
    assert result.stderr == b"read 100000\n"
    assert result.stdout == b""

    assert run(SshSpec("node1"), ["true"], timeout=TIMEOUT, accept_new=False).exit_status == 0


def test_arguments_arrive_as_single_words(home: Path) -> None:
    words = ["a b", "it's", "$(touch /tmp/pwned)", "; exit 9", "*", "", "new\nline"]
    echo = "import json, sys; print(json.dumps(sys.argv[1:]))"
    result = run(
        SshSpec("node2"), [sys.executable, "-c", echo, *words], timeout=TIMEOUT, accept_new=False
    )
    assert result.exit_status == 0, result.stderr
    assert json.loads(result.stdout) == words


class Zeros:
    def __init__(self, total: int) -> None:
        self.left = total

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


def test_a_command_that_exits_early_does_not_hang_the_sender(home: Path) -> None:
    size = 1 << 30
    sent: list[int] = [0]
    started = time.monotonic()

    result = exec_stream(
        SshSpec("node3"),
        ["head", "-c", "10"],
        Zeros(size),  # type: ignore[arg-type]
        size=size,
        progress=lambda n: sent.__setitem__(0, n),
        timeout=TIMEOUT,
        accept_new=False,
    )

    elapsed = time.monotonic() - started
    assert result.exit_status == 0
    assert result.stdout == b"\0" * 10
    # Sending stopped soon after head exited, long before the GiB was through.
    assert sent[0] < size // 4, sent[0]
    assert elapsed < 10, elapsed


def test_a_connection_lost_mid_stream_is_transient(home: Path) -> None:
    # The command kills the sshd process serving this session: the TCP connection drops
    # while 1 GiB is still being sent.
    size = 1 << 30
    started = time.monotonic()

    with pytest.raises(TransportError) as caught:
        exec_stream(
            SshSpec("node3"),
            sh("head -c 4000000 > /dev/null; kill -9 $PPID"),
            Zeros(size),  # type: ignore[arg-type]
            size=size,
            timeout=TIMEOUT,
            accept_new=False,
        )

    assert caught.value.exit_code == ExitCode.TRANSIENT
    assert "dropped" in caught.value.message
    assert time.monotonic() - started < 15


def test_unknown_host_key_is_refused(home: Path, servers: list[Sshd]) -> None:
    (home / ".ssh" / "known_hosts").write_text("")
    marker = home / "ran"

    with pytest.raises(HostKeyError) as caught:
        run(SshSpec("node0"), ["touch", str(marker)], timeout=TIMEOUT, accept_new=False)

    assert caught.value.exit_code == ExitCode.REFUSED
    assert int(caught.value.exit_code) == 3
    assert servers[0].host_fingerprint in caught.value.message
    assert "unknown host key" in caught.value.message
    assert not marker.exists()
    assert (home / ".ssh" / "known_hosts").read_text() == ""


def test_unreachable_node_is_transient(home: Path) -> None:
    with pytest.raises(TransportError) as caught:
        run(SshSpec("127.0.0.1", "root", free_port()), ["true"], timeout=5, accept_new=False)
    assert caught.value.exit_code == ExitCode.TRANSIENT
    assert int(caught.value.exit_code) == 7
    assert "connection refused" in caught.value.message


def test_the_cipher_is_aes_gcm_when_offered(home: Path) -> None:
    run(SshSpec("node0"), ["true"], timeout=TIMEOUT, accept_new=False)
    with ssh._pool_lock:
        shared = next(iter(ssh._pool.values()))
    transport = shared.client.get_transport()
    assert transport is not None
    assert transport.local_cipher == "aes128-gcm@openssh.com"
    sock = transport.sock
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# ---- push -----------------------------------------------------------------------------


@pytest.fixture
def fleet(home: Path, tmp_path: Path, servers: list[Sshd]) -> Fleet:
    return Fleet(tmp_path, servers)


class Fleet:
    """The fake nodes' directories (one per sshd port) and a bundle to push."""

    def __init__(self, tmp_path: Path, servers: list[Sshd]) -> None:
        self.root = tmp_path / "nodes"
        self.dirs = []
        for server in servers:
            d = self.root / str(server.port)
            d.mkdir(parents=True)
            self.dirs.append(d)
        self.targets = [PushTarget(f"node{i}", SshSpec(f"node{i}")) for i in range(len(servers))]
        self.bundle = tmp_path / "spk-2.5.0.spkb"
        self.sha256 = random_file(self.bundle, 3 << 20)

    def behave(self, i: int, **conf: Any) -> None:
        (self.dirs[i] / "node.json").write_text(json.dumps(conf))

    def push(self, **kw: Any) -> list[PushResult]:
        kw.setdefault("timeout", TIMEOUT)
        kw.setdefault("accept_new", False)
        return push(
            self.bundle,
            self.targets,
            remote_command=(sys.executable, str(FAKE_NODE), "--root", str(self.root)),
            **kw,
        )

    def log(self, i: int) -> list[dict[str, Any]]:
        path = self.dirs[i] / "log.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def span(self, i: int) -> tuple[float, float]:
        """When node i's first command started and its last one ended (CLOCK_MONOTONIC)."""
        times = [e["t"] for e in self.log(i)]
        return min(times), max(times)

    def received(self, i: int) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.dirs[i] / "received.json").read_text())
        return doc

    def applying(self, i: int) -> float:
        """When node i had the whole bundle and began to apply it (CLOCK_MONOTONIC)."""
        (t,) = [e["t"] for e in self.log(i) if e["what"] == "applying"]
        return float(t)

    def applied(self, i: int) -> bool:
        return any(e["what"] == "applying" for e in self.log(i))


def max_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = now = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


def test_canary_first_then_the_rest_within_the_parallel_limit(fleet: Fleet) -> None:
    for i in range(NODES):
        fleet.behave(i, apply_delay=0.6, version="2.5.0", plan_version="2.6.0", downtime_ms=100 + i)
    # The canary verifies for long enough that the others' spk-visor surely started (the
    # time of an sshd session and a Python start on a loaded machine) before it is done.
    fleet.behave(0, apply_delay=2.0, version="2.5.0", plan_version="2.6.0", downtime_ms=100)
    events: list[tuple[str, str]] = []

    class Recorder:
        def __init__(self, target: PushTarget, size: int) -> None:
            self.name = target.name
            assert size == 3 << 20

        def sent(self, done: int) -> None:
            events.append((self.name, f"sent {done}"))

        def event(self, doc: Any) -> None:
            events.append((self.name, str(doc.get("event"))))

        def finish(self, result: PushResult) -> None:
            events.append((self.name, f"finish {result.exit_code}"))

    results = fleet.push(parallel=2, progress_factory=Recorder)

    assert [r.node for r in results] == ["node0", "node1", "node2", "node3"]
    for i, r in enumerate(results):
        assert (r.exit_code, r.phase, r.version, r.downtime_ms) == (
            0,
            "committed",
            "2.5.0",
            100 + i,
        )
        assert r.seconds > 0.6
        received = fleet.received(i)
        assert (received["sha256"], received["bytes"]) == (fleet.sha256, 3 << 20)
        # One command per node: it verifies, then follows the update to its outcome.
        assert received["argv"][3:] == ["ota", "apply", "--bundle", "-", "--json"]
        assert [(e["cmd"], e["what"]) for e in fleet.log(i)] == [
            ("apply", "start"), ("apply", "applying"), ("apply", "started"), ("apply", "end"),
        ]  # fmt: skip
    canary_done = fleet.span(0)[1]
    # No other node applied before the canary was done...
    assert all(canary_done < fleet.applying(i) for i in range(1, NODES))
    # ...but the first two were sent the bundle while the canary applied, all of it but
    # the last byte: they waited there for its verdict.
    assert fleet.span(1)[0] < canary_done and fleet.span(2)[0] < canary_done
    # Then the three others with two at once applying, never three.
    assert max_overlap([(fleet.applying(i), fleet.span(i)[1]) for i in range(1, NODES)]) == 2
    # Progress: bytes, the node's NDJSON events, then the result, per node.
    for name in ("node0", "node1", "node2", "node3"):
        mine = [what for who, what in events if who == name]
        assert f"sent {3 << 20}" in mine
        if name == "node0":
            assert "waiting" not in mine  # the canary's stream is never held
        else:  # held one byte short, then completed
            assert mine.index(f"sent {(3 << 20) - 1}") < mine.index("waiting")
            assert mine.index("waiting") < mine.index(f"sent {3 << 20}")
        assert mine.count("progress") == 3  # one per MiB read by the node
        assert mine[-2:] == ["result", "finish 0"]


CUT = "the bundle sent ahead was cut 1 byte short, so the node applied none of it (it exited 3)"


def test_a_failed_canary_stops_the_push(fleet: Fleet) -> None:
    # The others get the bundle, all but its last byte, while the canary takes a second.
    fleet.behave(0, apply_delay=1.0, apply_exit=3, message="signature threshold not met (1 of 2)")

    results = fleet.push(parallel=4)

    first, *rest = results
    assert (first.exit_code, first.phase) == (3, "apply")
    assert first.message == "signature threshold not met (1 of 2)"
    assert [(e["cmd"], e["what"]) for e in fleet.log(0)] == [
        ("apply", "start"), ("apply", "applying"), ("apply", "end"),
    ]  # fmt: skip
    for i, r in enumerate(rest, 1):
        assert (r.exit_code, r.phase) == (ExitCode.NOT_ELIGIBLE, "skipped")
        assert r.message == f"not started: the canary node0 failed (exit 3); {CUT}"
        # Sent ahead, then cut one byte short: the node refused it and applied nothing.
        assert not fleet.applied(i)
        assert (fleet.received(i)["bytes"], fleet.received(i)["cut"]) == ((3 << 20) - 1, True)
    assert overall_exit(results) == ExitCode.REFUSED


def test_stop_on_failure_skips_the_nodes_not_started(fleet: Fleet) -> None:
    fleet.behave(0, apply_delay=1.0)  # node1 and node2 are sent the bundle meanwhile
    fleet.behave(1, status_exit=5, phase="rolled_back", message="health check failed")

    results = fleet.push(parallel=1, stop_on_failure=True)

    assert [(r.exit_code, r.phase) for r in results] == [
        (0, "committed"), (5, "rolled_back"), (8, "skipped"), (8, "skipped"),
    ]  # fmt: skip
    assert results[1].message == "health check failed"
    stopped = "not started: stopped after node1 failed (--stop-on-failure)"
    # node2 waited, sent ahead (one applying and one waiting at --parallel 1), and was cut
    # short; node3 was never contacted.
    assert results[2].message == f"{stopped}; {CUT}"
    assert not fleet.applied(2) and fleet.received(2)["cut"] is True
    assert fleet.log(3) == []
    assert overall_exit(results) == ExitCode.ROLLED_BACK  # the failure, not the skips
    lines = summary_table(results).splitlines()
    assert lines[0].split() == ["NODE", "EXIT", "STATE", "VERSION", "DOWNTIME", "TIME", "MESSAGE"]
    assert lines[2].split()[:6] == ["node1", "5", "daemon", "rolled", "back", "2.5.0"]
    assert lines[2].endswith("health check failed")
    assert results[3].to_doc() == {
        "node": "node3",
        "exit_code": 8,
        "phase": "skipped",
        "version": None,
        "downtime_ms": None,
        "message": stopped,
        "seconds": 0.0,
        "state": "not started",
        "hint": None,  # a skipped node did nothing wrong: the failure's hint says it
    }


def test_without_stop_on_failure_every_node_is_tried(fleet: Fleet) -> None:
    fleet.behave(1, status_exit=5, phase="rolled_back")
    fleet.behave(2, apply_exit=6, message="another OTA operation is running")

    results = fleet.push(parallel=1)

    assert [r.exit_code for r in results] == [0, 5, 6, 0]
    assert results[2].phase == "apply"
    assert results[2].message == "another OTA operation is running"
    assert not [e for e in fleet.log(2) if e["what"] == "started"]  # refused: nothing ran
    assert fleet.received(3)["sha256"] == fleet.sha256


def test_without_a_canary_every_node_applies_at_most_parallel_at_once(fleet: Fleet) -> None:
    for i in range(NODES):
        fleet.behave(i, apply_delay=1.0)
    done: list[list[PushResult]] = []
    # In a thread with a deadline: a push whose gates never open would wait forever.
    worker = threading.Thread(
        target=lambda: done.append(fleet.push(parallel=2, canary=False)), daemon=True
    )
    worker.start()
    worker.join(120)

    assert done, "the push never ended: no node was let to apply"
    assert [r.exit_code for r in done[0]] == [0] * NODES
    assert max_overlap([(fleet.applying(i), fleet.span(i)[1]) for i in range(NODES)]) == 2


def test_a_node_that_stops_reading_early(fleet: Fleet) -> None:
    # As a node does on a bad bundle header: read a little, refuse, exit.
    fleet.behave(1, apply_read_limit=4096, apply_exit=3, message="not an spk-visor bundle")

    results = fleet.push(parallel=4, canary=False)

    assert [r.exit_code for r in results] == [0, 3, 0, 0]
    assert results[1].message == "not an spk-visor bundle"
    assert fleet.received(1)["bytes"] == 4096


def test_unreachable_and_untrusted_nodes(fleet: Fleet, home: Path, servers: list[Sshd]) -> None:
    known = home / ".ssh" / "known_hosts"
    # node2's host key is not trusted; node3 points at a port where nothing listens.
    known.write_text(
        "".join(f"{s.known_hosts_name} {s.host_pub}\n" for i, s in enumerate(servers) if i != 2)
    )
    config = home / ".ssh" / "config"
    config.write_text(config.read_text().replace(f"Port {servers[3].port}", f"Port {free_port()}"))

    results = fleet.push(parallel=4, canary=False, timeout=5)

    assert [r.exit_code for r in results] == [0, 0, 3, 7]
    assert "unknown host key" in results[2].message
    assert "connection refused" in results[3].message
    assert results[2].phase == results[3].phase == "apply"
    assert fleet.log(2) == []


def test_a_node_that_never_finishes_is_given_up_on(fleet: Fleet) -> None:
    fleet.behave(0, status_delay=3)  # the fake node exits by itself soon after
    started = time.monotonic()

    results = fleet.push(follow_timeout=1)

    assert time.monotonic() - started < 10
    assert (results[0].exit_code, results[0].phase) == (7, "follow")
    assert "did not finish within 1 s" in results[0].message
    assert [r.phase for r in results[1:]] == ["skipped"] * 3


def test_progress_bars_on_stderr(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.behave(2, apply_exit=3, message="refused")

    results = fleet.push(parallel=4, show_progress=True)

    err = capsys.readouterr().err
    assert [r.exit_code for r in results] == [0, 0, 3, 0]
    for i in range(NODES):
        assert f"node{i}" in err
    assert "3.00M/3.00M" in err  # the whole bundle, per node
    assert "sent; waits for the canary or a free slot" in err  # the others, sent ahead
    assert "exit 3: apply" in err
    assert overall_exit(results) == ExitCode.REFUSED


def test_push_needs_ssh_targets(tmp_path: Path) -> None:
    def settings(*targets: Target) -> Settings:
        return Settings(targets, None, 10.0, False, None)

    spec = SshSpec("host-a", "root", 2222)
    node = Target("a", ssh=spec)
    assert targets_from_settings(settings(node)) == [PushTarget("a", spec)]
    with pytest.raises(UsageError, match="node b is reached by URL"):
        targets_from_settings(settings(node, Target("b", url="http://10.0.0.2:8080")))
    with pytest.raises(UsageError, match="cannot read the bundle"):
        push(tmp_path / "missing.spkb", [], timeout=1, accept_new=False)
