"""What every hostile test ends with, and the attacker's tools.

The proof (issue 11): nothing crashed, nothing was lost, no one got in, and the service
still serves. `Baseline` is taken before the attack and `prove` checks against it after.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.daemon import Daemon, wait_for

# Source addresses: the attacker and the honest client are different hosts to the daemon.
ATTACKER = "127.0.0.9"
CLIENT = "127.0.0.1"


@dataclass
class Baseline:
    pid: int
    vms: dict[str, str]  # managed VM id -> state


def baseline(d: Daemon) -> Baseline:
    health = d.get("/api/health")
    assert health.status == 200, health.raw
    listed = d.get("/api/vms")
    assert listed.status == 200, listed.raw
    vms = {v["id"]: v["state"] for v in listed.json if v["managed"]}
    return Baseline(pid=health.json["pid"], vms=vms)


def prove(d: Daemon, before: Baseline, *, vms: dict[str, str] | None = None) -> None:
    """`vms`: the managed VMs (id -> state) expected now, when the test changed them."""
    # Nothing crashed: the same process, no traceback, no internal error answered.
    assert d.alive(), "\n".join(d.lines[-30:])
    health = d.get("/api/health")
    assert health.status == 200, health.raw
    assert health.json["pid"] == before.pid
    log = "\n".join(d.lines)
    assert "Traceback" not in log, log[-4000:]
    assert not [line for line in d.lines if "smechvisord.access" in line and " 500 " in line]
    # No one got in: without the token, or with a wrong one, the API still refuses.
    assert d.get("/api/vms", token=None).status == 401
    assert d.get("/api/vms", token="not-the-token").status == 403
    # Nothing lost: every VM is still there, in the state expected.
    listed = d.get("/api/vms")
    assert listed.status == 200, listed.raw
    now = {v["id"]: v["state"] for v in listed.json if v["managed"]}
    assert now == (before.vms if vms is None else vms)
    # Still serves: an authenticated read answers.
    assert d.get("/api/node").status == 200


def connect_from(source: str, port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for s in held:
            with contextlib.suppress(OSError):
                s.close()


def read_until_closed(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def exchange(
    d: Daemon, raw: bytes, source: str = CLIENT, wait: float = 5.0, half_close: bool = False
) -> bytes:
    """Send raw bytes on a fresh connection (then half-close it, if asked); all the daemon
    answers until it closes or goes quiet for `wait` seconds."""
    with contextlib.closing(connect_from(source, d.port, timeout=wait)) as s:
        try:
            s.sendall(raw)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the daemon refused early and closed: its answer is still readable
        return read_until_closed(s, wait)


def status_of(answer: bytes) -> int:
    line = answer.split(b"\r\n", 1)[0].split()
    assert len(line) >= 2 and line[0].startswith(b"HTTP/1."), answer[:200]
    return int(line[1])


def closed(s: socket.socket, timeout: float) -> bool:
    """True when the daemon closed `s` within `timeout` seconds."""
    s.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if s.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


__all__ = ["wait_for"]
