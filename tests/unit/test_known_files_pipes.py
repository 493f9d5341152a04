"""~/.ssh/known_hosts and spk-visor's known_certs are settings files: when one is a named
pipe (a mistake, or a `<(...)` left in an environment variable), reading it waited forever
for a writer, and recording a key wrote it into the pipe. Like every other settings file
(tests/integration/test_cli_endless_files.py), they are now refused at once, exit 2,
naming the file; recording writes nothing.

Each read runs in a thread with a deadline, so a hang fails the test; the pipe is then
opened for writing once, which releases the stuck reader.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest

from spk_visor.errors import ConfigError, ExitCode, SpkVisorError
from spk_visor.transport import ssh, tls_pinning

DEADLINE = 10.0


def outcome_within_deadline(fifo: Path, call: Callable[[], object]) -> BaseException | None:
    """What `call` raised (None if it returned); fails the test if it blocks."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            box.append(None)
        except BaseException as e:  # reported below
            box.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(DEADLINE)
    if worker.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a writer: the open returns
        os.close(fd)
        worker.join(DEADLINE)
        pytest.fail(f"reading {fifo} blocked for {DEADLINE} s")
    return box[0]


def test_known_certs_that_is_a_pipe_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "known_certs"
    os.mkfifo(fifo)
    error = outcome_within_deadline(fifo, lambda: tls_pinning.lookup(fifo, "node1:8443"))
    assert isinstance(error, ConfigError), error
    assert error.exit_code == ExitCode.USAGE and str(fifo) in error.message, error.message
    assert "pipe" in error.message, error.message


def test_recording_a_certificate_into_a_pipe_writes_nothing(tmp_path: Path) -> None:
    fifo = tmp_path / "known_certs"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # what would see a write
    try:
        with pytest.raises(ConfigError) as e:
            tls_pinning.record(fifo, "node1:8443", "AB" * 32)
        assert e.value.exit_code == ExitCode.USAGE and str(fifo) in e.value.message
        assert os.read(reader, 100) == b""  # nothing was written, and no writer is left
    finally:
        os.close(reader)


@pytest.fixture
def fifo_known_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    fifo = home / ".ssh" / "known_hosts"
    os.mkfifo(fifo)
    assert ssh.user_known_hosts() == fifo
    return fifo


def test_known_hosts_that_is_a_pipe_is_refused(fifo_known_hosts: Path) -> None:
    error = outcome_within_deadline(
        fifo_known_hosts, lambda: ssh.load_known_hosts(paramiko.HostKeys())
    )
    assert isinstance(error, SpkVisorError), error
    assert error.exit_code == ExitCode.USAGE, error
    assert str(fifo_known_hosts) in error.message and "pipe" in error.message, error.message


def test_recording_a_host_key_into_a_pipe_writes_nothing(fifo_known_hosts: Path) -> None:
    reader = os.open(fifo_known_hosts, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pkey = paramiko.RSAKey.generate(1024)
        with pytest.raises(ConfigError) as e:
            ssh.record_host_key(fifo_known_hosts, "node1", pkey)
        assert e.value.exit_code == ExitCode.USAGE and str(fifo_known_hosts) in e.value.message
        assert os.read(reader, 100) == b""
    finally:
        os.close(reader)


# /dev/null is "keep no key", as OpenSSH's UserKnownHostsFile=/dev/null: nothing is known,
# and --accept-new's recording goes nowhere without an error. Any other device is refused.


def test_known_certs_that_is_dev_null_knows_nothing_and_keeps_nothing(tmp_path: Path) -> None:
    null = tmp_path / "known_certs"
    null.symlink_to(os.devnull)
    assert tls_pinning.lookup(null, "node1:8443") is None
    tls_pinning.record(null, "node1:8443", "AB" * 32)
    assert tls_pinning.lookup(null, "node1:8443") is None


def test_known_hosts_that_is_dev_null_knows_nothing_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    (home / ".ssh" / "known_hosts").symlink_to(os.devnull)
    keys = paramiko.HostKeys()
    ssh.load_known_hosts(keys)
    ssh.record_host_key(ssh.user_known_hosts(), "node1", paramiko.RSAKey.generate(1024))
    ssh.load_known_hosts(keys)
    assert list(keys.keys()) == []


def test_recording_into_another_device_is_refused(tmp_path: Path) -> None:
    zero = tmp_path / "known_certs"
    zero.symlink_to("/dev/zero")
    with pytest.raises(ConfigError) as e:
        tls_pinning.record(zero, "node1:8443", "AB" * 32)
    assert e.value.exit_code == ExitCode.USAGE and str(zero) in e.value.message
    with pytest.raises(ConfigError) as e:
        ssh.record_host_key(zero, "node1", paramiko.RSAKey.generate(1024))
    assert "/dev/null" in (e.value.hint or ""), e.value.hint
