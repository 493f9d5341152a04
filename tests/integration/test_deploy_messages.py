"""What deploy says to the operator on both ends (issue 10, #14), over real loopback TCP and
real processes: the wrong-code wait, checks made before connecting, the code's form, and
`deploy receive` stopping on Ctrl-C even when it inherited SIGINT as ignored.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.deploy import donor, guard, inventory, receiver
from spk_visor.errors import ExitCode
from spk_visor.trust import roots
from tests.support.ota_pki import Pki, make_bundle
from tests.support.prereq import need_root

# The wrong-code wait the target is given: long enough that a loaded machine still
# connects inside it (the message's seconds are checked against it).
WAIT = 8.0

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spk_visor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=REPO,
        check=False,
    )


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port on loopback that records whether anyone connected."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(1.0)
    yield srv
    srv.close()


def _connected(srv: socket.socket) -> bool:
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        return False
    conn.close()
    return True


@pytest.fixture
def target(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> Iterator[receiver.Receiver]:
    """A receiver serving 127.0.0.1 on a free port in this process, with a WAIT s
    wrong-code wait (longer than the default, so a loaded machine still connects inside
    it)."""
    monkeypatch.setattr(inventory, "inventory", lambda **kw: [])
    root = roots.load_anchor(pki.root_env().to_bytes(), "test root")
    options = receiver.Options(
        trust_root=root,
        mountpoint=tmp_path / "mnt",
        port=0,
        bind="127.0.0.1",
        announce=False,
        policy=guard.Policy(fail_delay=WAIT),
    )
    events: list[tuple[str, dict[str, Any]]] = []
    r = receiver.Receiver(options, lambda e, d: events.append((e, d)))
    r.events = events  # type: ignore[attr-defined]
    thread = threading.Thread(target=r.serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(e == "code" for e, _ in events) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r._listener is not None
    yield r
    r.stop()
    thread.join(timeout=15)


def _handshake(r: receiver.Receiver, code_text: str) -> donor.DeployFailed | None:
    """One donor session's handshake against `r`; the failure, or None when accepted."""
    t = donor.Target(code_text, r.code.nameplate, "127.0.0.1", r.port, None)
    session = donor._Session(t, None, donor.Settings(), donor._Silent())  # type: ignore[arg-type]
    sock = socket.create_connection(("127.0.0.1", r.port), timeout=10)
    try:
        chan = session._handshake(sock)
    except donor.DeployFailed as e:
        return e
    finally:
        sock.close()
    chan.close()
    return None


def test_right_code_in_the_wrong_code_wait_is_told_the_wait_and_its_length(
    target: receiver.Receiver,
) -> None:
    """Right after a wrong code, the right code was refused as "serving another donor
    (BUSY)": the operator was told to wait for a donor that does not exist."""
    right = str(target.code)
    secret = right.split("-")[1]
    wrong = f"{target.code.nameplate}-{'0' if secret[0] != '0' else '1'}{secret[1:]}"
    failed = _handshake(target, wrong)
    assert failed is not None and failed.exit_code == ExitCode.REFUSED
    started = time.monotonic()
    failed = _handshake(target, right)
    assert time.monotonic() - started < WAIT, "the test connected after the wait ended"
    assert failed is not None
    # Not busy: this address waits out its wrong code (docs/deploy-security.md), exit 8.
    assert failed.exit_code == ExitCode.NOT_ELIGIBLE
    message = failed.message
    assert "wrong-code wait" in message, message
    assert "another donor" not in message, message
    # How long: the seconds left, at most the wait and more than nothing.
    seconds = [float(w) for w in message.replace("(", " ").split() if w.replace(".", "").isdigit()]
    assert seconds and 0 < seconds[0] <= WAIT, message
    refused = [d for e, d in target.events if e == "limited"]  # type: ignore[attr-defined]
    assert refused and 0 < refused[-1]["seconds"] <= WAIT
    # After the wait the right code is served.
    time.sleep(WAIT + 0.2)
    assert _handshake(target, right) is None


def test_a_donor_already_serving_is_still_plain_busy(target: receiver.Receiver) -> None:
    # Only a donor that proved the code takes the target (a silent socket does not).
    t = donor.Target(str(target.code), target.code.nameplate, "127.0.0.1", target.port, None)
    first = donor._Session(t, None, donor.Settings(), donor._Silent())  # type: ignore[arg-type]
    sock = socket.create_connection(("127.0.0.1", target.port), timeout=10)
    try:
        chan = first._handshake(sock)
        deadline = time.monotonic() + 10
        while not target._busy.locked() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert target._busy.locked(), "the first donor never took the target"
        failed = _handshake(target, str(target.code))
        chan.close()
    finally:
        sock.close()
    assert failed is not None and failed.exit_code == ExitCode.BUSY
    assert "another donor" in failed.message and "wrong-code" not in failed.message


def test_the_donor_checks_the_hostname_before_it_connects(
    tmp_path: Path, pki: Pki, listener: socket.socket
) -> None:
    bundle = make_bundle(tmp_path, pki).bundle
    port = listener.getsockname()[1]
    done = _cli(
        "deploy",
        "send",
        "42-K7QX9",
        "--bundle",
        str(bundle),
        "--target",
        f"127.0.0.1:{port}",
        "--hostname",
        "Bad_Host",
    )
    assert done.returncode == 2, done.stderr
    assert "hostname 'Bad_Host' is not valid" in done.stderr
    assert "lowercase" in done.stderr
    assert not _connected(listener), "the donor connected before checking the hostname"


@pytest.mark.parametrize("typed", ["4-K7QX9", "42K7QX9", "42-K7QX", "42-K7*X9", "AB-K7QX9"])
def test_a_malformed_code_shows_the_expected_form(typed: str, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    done = _cli(
        "deploy", "send", typed, "--bundle", "/nonexistent.spkb", "--target", f"127.0.0.1:{port}"
    )
    assert done.returncode == 2, done.stderr
    assert "NN-XXXXX" in done.stderr, done.stderr
    assert "internal error" not in done.stderr
    assert not _connected(listener)


def test_receive_started_with_sigint_ignored_still_stops_on_ctrl_c(
    tmp_path: Path, pki: Pki
) -> None:
    """A script's background job (`spk-visor deploy receive &` in sh without job control)
    inherits SIGINT as ignored; Python then installs no KeyboardInterrupt handler and
    Ctrl-C (or kill -INT) did nothing. The shell's `trap '' INT` sets it here."""
    need_root()
    root = tmp_path / "root.json"
    root.write_bytes(pki.root_env().to_bytes())
    argv = [
        sys.executable,
        "-m",
        "spk_visor",
        "deploy",
        "receive",
        "--json",
        "--no-announce",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--trust-root",
        str(root),
        "--mountpoint",
        str(tmp_path / "mnt"),
    ]
    # `trap '' INT` makes the ignoring explicit (sh's background jobs get it anyway, but
    # only in the child, racing this test's check); a disposition of "ignore" survives exec.
    script = 'trap "" INT; "$@" & echo "pid $!" >&2; wait $!; echo "rc $?" >&2'
    sh = subprocess.Popen(
        ["sh", "-c", script, "sh", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=REPO,
        text=True,
    )
    assert sh.stderr is not None and sh.stdout is not None
    try:
        first = sh.stderr.readline()
        assert first.startswith("pid "), first
        pid = int(first.split()[1])
        # The shell forked it with SIGINT ignored (what the child inherits).
        ignored = int(_status(sh.pid, "SigIgn"), 16)
        assert ignored & (1 << (signal.SIGINT - 1)), "sh did not start it with SIGINT ignored"
        line = sh.stdout.readline()  # the code screen: the receiver is serving
        assert json.loads(line)["event"] == "code", line
        os.kill(pid, signal.SIGINT)
        try:
            sh.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("deploy receive ignored SIGINT")
        rest = sh.stderr.read()
        assert "rc 130" in rest, rest
        last = json.loads(sh.stdout.read().splitlines()[-1])
        assert last["event"] == "stopped" and last["reason"] == "interrupted", last
    finally:
        if sh.poll() is None:
            os.kill(pid, signal.SIGKILL)
            sh.kill()
            sh.wait(timeout=10)


def _status(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split()[1]
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def test_a_failed_send_says_absent_values_in_words(tmp_path: Path, pki: Pki) -> None:
    """A target that could not be reached showed "-" as its verifier, and a discovery of
    half a second said "waited 0 s"."""
    bundle = make_bundle(tmp_path, pki).bundle
    done = _cli(
        "deploy", "send", "42-K7QX9", "--bundle", str(bundle), "--discovery-timeout", "0.5",
        "--discovery-port", str(free_udp_port()),
    )  # fmt: skip
    assert done.returncode == 7, done.stderr
    row = done.stdout.splitlines()[1].split()
    assert row[:4] == ["42", "7", "discovery", "none"], done.stdout
    assert "waited 0.5 s" in done.stdout, done.stdout


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
