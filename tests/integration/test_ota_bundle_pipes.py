"""A bundle that is a pipe: `ota push <(curl ...) ...`, a named FIFO, `/dev/stdin`, `-`.

`ota push` took the bundle's size from stat() (0 for a pipe) and opened it once per node:
the first node got a bundle of size 0, the next ones waited for a writer that never came.
Now a pipe is copied once into a private temporary file, checked like a named bundle, and
pushed like a file to every node; the copy is removed at the end. The node commands
(`check`, `apply`, `inspect`, `verify`) read a pipe once, as they read stdin.

Every run is a separate process with a deadline, and every writer gives up after one:
a hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from spk_visor.errors import ExitCode, UsageError
from spk_visor.ota import spool
from tests.support import fake_bundle
from tests.support.cli import NO_KNOWN_CERTS
from tests.support.ota_pki import Node, Pki, make_bundle, tiny_tree
from tests.support.sshd import Sshd

FAKE_NODE = Path(__file__).resolve().parents[1] / "support" / "bin" / "fake-ota-node"
DEADLINE = 60.0
SIZE = 3 << 20


class Writer(threading.Thread):
    """Writes `data` into the FIFO at `path` once a reader opens it; gives up at the
    deadline (a non-blocking open fails with ENXIO while no reader has it open)."""

    def __init__(self, path: Path, data: bytes) -> None:
        super().__init__(daemon=True)
        self.path, self.data = path, data
        self.error: BaseException | None = None
        self.opened = False

    def run(self) -> None:
        end = time.monotonic() + DEADLINE
        try:
            while True:
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                    break
                except OSError as e:
                    if e.errno != errno.ENXIO or time.monotonic() > end:
                        raise
                    time.sleep(0.02)
            self.opened = True
            os.set_blocking(fd, True)
            try:
                view = memoryview(self.data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except BrokenPipeError:
            pass  # the reader stopped early (it refused what it read)
        except BaseException as e:  # reported by the test
            self.error = e


def spk_visor(
    home: Path,
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPK_VISOR_")}
    clean.update(
        {
            "HOME": str(home),
            "SPK_VISOR_CONFIG": str(home / "no-config.toml"),
            "SPK_VISOR_KNOWN_CERTS": NO_KNOWN_CERTS,
            "TMPDIR": str(home / "tmp"),
            **(env or {}),
        }
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "spk_visor", *args],
            env=clean,
            input=stdin.decode("latin-1") if stdin is not None else None,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="latin-1",
            timeout=DEADLINE,
            check=False,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"spk-visor {' '.join(args)} did not end within {DEADLINE} s (a hang)")
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture
def home(tmp_path: Path, sshd: Sshd) -> Path:
    """~/.ssh with host aliases node0 and node1, both the one sshd (the fake node tells
    nodes apart by port, so both write the same log); a private TMPDIR."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / "tmp").mkdir()
    (home / ".ssh" / "config").write_text(
        "".join(
            f"Host {name}\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
            f"    User root\n    IdentityFile {sshd.user_key}\n"
            for name in ("node0", "node1")
        )
    )
    (home / ".ssh" / "known_hosts").write_text(f"{sshd.known_hosts_name} {sshd.host_pub}\n")
    node = tmp_path / "nodes" / str(sshd.port)
    node.mkdir(parents=True)
    wrapper = home / "spk-visor-node"
    wrapper.write_text(
        f'#!/bin/sh\nexec {sys.executable} {FAKE_NODE} --root {tmp_path / "nodes"} "$@"\n'
    )
    wrapper.chmod(0o755)
    return home


def node_dir(home: Path, sshd: Sshd) -> Path:
    return home.parent / "nodes" / str(sshd.port)


def applies(home: Path, sshd: Sshd) -> list[dict[str, object]]:
    log = node_dir(home, sshd) / "log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [d for d in map(json.loads, lines) if d["cmd"] == "apply" and d["what"] == "end"]


def push_args(home: Path, bundle: str, *nodes: str) -> list[str]:
    """`ota push` of `bundle` to the group of `nodes` (config.toml in `home`)."""
    config = home / "no-config.toml"
    config.write_text(
        "".join(f'[nodes.{n}]\nssh = "{n}"\n' for n in nodes)
        + f"[groups]\nrack = {json.dumps(list(nodes))}\n"
    )
    return [
        "--json", "--fleet", "rack", "ota", "push", bundle,
        "--remote-command", str(home / "spk-visor-node"), "--parallel", "2",
    ]  # fmt: skip


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[bytes, str]:
    path = tmp_path / "spk.spkb"
    digest = fake_bundle.write(path, SIZE)
    return path.read_bytes(), digest


def test_push_from_a_named_fifo_to_two_nodes(
    home: Path, sshd: Sshd, bundle: tuple[bytes, str], tmp_path: Path
) -> None:
    data, digest = bundle
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    writer = Writer(fifo, data)
    writer.start()
    proc = spk_visor(home, *push_args(home, str(fifo), "node0", "node1"))
    writer.join(DEADLINE)
    assert writer.error is None, writer.error
    assert proc.returncode == 0, proc
    results = json.loads(proc.stdout)
    assert [r["exit_code"] for r in results] == [0, 0], results
    assert len(applies(home, sshd)) == 2
    received = json.loads((node_dir(home, sshd) / "received.json").read_text())
    assert received["sha256"] == digest and received["bytes"] == SIZE, received
    assert list((home / "tmp").iterdir()) == []  # the private copy is gone


def test_push_from_dev_stdin_and_dash(home: Path, sshd: Sshd, bundle: tuple[bytes, str]) -> None:
    """`/dev/stdin` fed by a pipe (as `curl URL | spk-visor ota push /dev/stdin`), and
    `-`, the way every other bundle option reads stdin."""
    data, digest = bundle
    for name in ("/dev/stdin", "-"):
        proc = spk_visor(home, *push_args(home, name, "node0"), stdin=data)
        assert proc.returncode == 0, (name, proc)
        received = json.loads((node_dir(home, sshd) / "received.json").read_text())
        assert received["sha256"] == digest and received["bytes"] == SIZE, (name, received)
    assert list((home / "tmp").iterdir()) == []


def test_push_of_dash_ignores_a_file_named_dash(
    tmp_path: Path, home: Path, sshd: Sshd, bundle: tuple[bytes, str]
) -> None:
    """`-` is stdin even where the current folder holds a stray file named `-`."""
    data, digest = bundle
    here = tmp_path / "here"
    here.mkdir()
    (here / "-").write_text("not a bundle\n")
    proc = spk_visor(home, *push_args(home, "-", "node0"), stdin=data, cwd=here)
    assert proc.returncode == 0, proc
    received = json.loads((node_dir(home, sshd) / "received.json").read_text())
    assert received["sha256"] == digest and received["bytes"] == SIZE, received


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"", "an empty file"), (b"\0" * (4 << 20), "bundle magic"), (b'{"a": 1}', "JSON")],
)
def test_push_of_a_pipe_that_is_not_a_bundle_contacts_no_node(
    home: Path, sshd: Sshd, tmp_path: Path, content: bytes, why: str
) -> None:
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    writer = Writer(fifo, content)
    writer.start()
    proc = spk_visor(home, *push_args(home, str(fifo), "node0"))
    writer.join(DEADLINE)
    assert proc.returncode == ExitCode.USAGE, proc
    error = json.loads(proc.stdout)["error"]  # --json: the error is the output
    assert f"{fifo} is not an OTA bundle" in error["message"] and why in error["message"], error
    assert error["exit_code"] == ExitCode.USAGE and "ota build" in error["hint"], error
    assert applies(home, sshd) == []
    assert list((home / "tmp").iterdir()) == []


def test_a_pipe_over_the_cap_is_refused_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle: tuple[bytes, str]
) -> None:
    monkeypatch.setattr(spool, "MAX_SPOOL", SIZE - 1)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    (tmp_path / "tmp").mkdir()
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    writer = Writer(fifo, bundle[0])
    writer.start()
    raised: list[BaseException] = []

    def spool_it() -> None:  # in a thread: a writer that never comes fails, not hangs
        try:
            with spool.as_file(fifo):
                pass
        except BaseException as error:  # reported below
            raised.append(error)

    reader = threading.Thread(target=spool_it, daemon=True)
    reader.start()
    reader.join(DEADLINE)
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # releases the reader's open
        reader.join(DEADLINE)
        pytest.fail(f"spooling {fifo} did not end within {DEADLINE} s")
    writer.join(DEADLINE)
    assert len(raised) == 1, raised
    e = raised[0]
    assert isinstance(e, UsageError), e
    assert str(fifo) in e.message and "GiB" in e.message, e.message
    assert e.hint and "file" in e.hint
    assert list((tmp_path / "tmp").iterdir()) == []


def test_node_commands_read_a_fifo_once(tmp_path: Path, ota_node: Node, ota_pki: Pki) -> None:
    """`ota inspect`, `verify` and `check` with a named FIFO: they read it as they read
    stdin, and end (no second open waiting for a writer)."""
    made = make_bundle(tmp_path, ota_pki, tree=tiny_tree(tmp_path / "t", "0.2.0"))
    data = made.bundle.read_bytes()
    root = tmp_path / "root.json"
    root.write_bytes(ota_pki.root_env().to_bytes())
    home = tmp_path / "h"
    (home / "tmp").mkdir(parents=True)
    for argv in (
        ["ota", "inspect"],
        ["ota", "verify", "--root", str(root)],
        ["ota", "check", "--bundle"],
    ):
        fifo = tmp_path / f"{argv[1]}.fifo"
        os.mkfifo(fifo)
        writer = Writer(fifo, data)
        writer.start()
        proc = spk_visor(home, *argv, str(fifo), env=ota_node.env)
        writer.join(DEADLINE)
        assert writer.error is None, writer.error
        assert proc.returncode == 0, (argv, proc)


def test_deploy_send_from_a_fifo_reads_the_whole_bundle(tmp_path: Path, ota_pki: Pki) -> None:
    """`deploy send --bundle <(...)` read the header, then took the size from stat() (0)
    and refused the bundle as "0 bytes, its manifest says N" (exit 3). Now the bundle is
    read whole; the send goes on to the target (here a closed port: unreachable, 7)."""
    made = make_bundle(tmp_path, ota_pki, tree=tiny_tree(tmp_path / "t", "0.2.0"))
    home = tmp_path / "h"
    (home / "tmp").mkdir(parents=True)
    fifo = tmp_path / "send.fifo"
    os.mkfifo(fifo)
    writer = Writer(fifo, made.bundle.read_bytes())
    writer.start()
    proc = spk_visor(
        home, "deploy", "send", "12-ABCDE", "--bundle", str(fifo), "--target", "127.0.0.1:9"
    )
    writer.join(DEADLINE)
    assert "0 bytes" not in proc.stderr + proc.stdout, proc
    assert "sending release 0.2.0" in proc.stderr, proc
    assert proc.returncode == ExitCode.TRANSIENT, proc
    assert list((home / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"", "an empty file"), (b"<html>404</html>\n", "bundle magic"), (b"\0" * 65536, "magic")],
)
def test_node_commands_say_a_pipe_of_something_else_is_not_a_bundle(
    tmp_path: Path, ota_node: Node, ota_pki: Pki, content: bytes, why: str
) -> None:
    """A named file that is not a bundle is the user's mistake (exit 2, "is not an OTA
    bundle"); a pipe of the same (curl's error page, an empty download) was refused as a
    bad bundle instead (exit 3, "bad magic" or "truncated ... copy the bundle again")."""
    root = tmp_path / "root.json"
    root.write_bytes(ota_pki.root_env().to_bytes())
    home = tmp_path / "h"
    (home / "tmp").mkdir(parents=True)
    before = ota_node.tree_digest()
    for argv in (
        ["ota", "inspect"],
        ["ota", "verify", "--root", str(root)],
        ["ota", "check", "--bundle"],
        ["ota", "apply", "--bundle"],
    ):
        fifo = tmp_path / f"{argv[1]}.fifo"
        os.mkfifo(fifo)
        writer = Writer(fifo, content)
        writer.start()
        proc = spk_visor(home, *argv, str(fifo), env=ota_node.env)
        writer.join(DEADLINE)
        fifo.unlink()
        assert proc.returncode == ExitCode.USAGE, (argv, proc)
        assert f"{fifo} is not an OTA bundle" in proc.stderr and why in proc.stderr, proc
    assert ota_node.tree_digest() == before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_signal_while_the_pipe_is_read_leaves_no_copy(
    tmp_path: Path, bundle: tuple[bytes, str], signum: int
) -> None:
    """The download stalls half-way and the admin presses Ctrl-C (exit 130 at once), or
    `timeout` sends SIGTERM, or the terminal closes (SIGHUP), or even SIGKILL: the half
    copy in TMPDIR is gone (it has no name from the start)."""
    home = tmp_path / "h"
    (home / "tmp").mkdir(parents=True)
    fifo = tmp_path / "stalled.fifo"
    os.mkfifo(fifo)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPK_VISOR_")}
    clean.update(
        HOME=str(home),
        SPK_VISOR_CONFIG=str(home / "none.toml"),
        SPK_VISOR_KNOWN_CERTS=NO_KNOWN_CERTS,
        TMPDIR=str(home / "tmp"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "spk_visor", "--ssh", "root@127.0.0.1:9", "ota", "push", str(fifo)],
        env=clean,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: this test's runner may have been started with the signal
        # ignored (a background job, nohup), which the child would inherit.
        preexec_fn=_as_from_a_terminal,  # noqa: PLW1509 (no lock taken: signal() only)
    )
    try:
        fd = -1
        end = time.monotonic() + DEADLINE
        while fd < 0:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO or time.monotonic() > end:
                    raise
                time.sleep(0.02)
        os.set_blocking(fd, True)
        os.write(fd, bundle[0][: 1 << 20])  # half, then nothing more
        while not _copying_into(proc.pid, home / "tmp") and time.monotonic() < end:
            time.sleep(0.02)
        assert _copying_into(proc.pid, home / "tmp"), ("no copy was being written", proc.poll())
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=DEADLINE)
        os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if signum == signal.SIGINT:
        assert proc.returncode == ExitCode.INTERRUPTED, (out, err)
    elif signum != signal.SIGKILL:
        assert proc.returncode == 128 + signum, (proc.returncode, out, err)
    assert "Traceback" not in err, err
    assert list((home / "tmp").iterdir()) == []


def _as_from_a_terminal() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _copying_into(pid: int, folder: Path) -> bool:
    """Whether process `pid` has a file under `folder` open (named or not)."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        links = [os.readlink(fd) for fd in fds.iterdir()]
    except OSError:  # it ended, or an fd closed while listed
        return False
    return any(link.startswith(f"{folder}/") for link in links)


def test_a_read_error_of_the_source_is_not_blamed_on_tmpdir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pipe that fails mid-read (EIO from a hung-up terminal or a broken device) is the
    source's fault: the message says so, and does not send the user to TMPDIR."""

    def failing_read(fd: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    read_end, write_end = os.pipe()
    os.write(write_end, b"x")  # the source has data: the read itself fails

    class Stdin:
        buffer = os.fdopen(read_end, "rb")

        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(spool, "_read", failing_read)
    monkeypatch.setattr(sys, "stdin", Stdin())
    try:
        with pytest.raises(UsageError) as e, spool.as_file("-"):
            pass
    finally:
        Stdin.buffer.close()
        os.close(write_end)
    assert "cannot read the bundle from stdin" in e.value.message, e.value.message
    assert "Input/output error" in e.value.message, e.value.message
    assert "TMPDIR" not in (e.value.hint or ""), e.value.hint
