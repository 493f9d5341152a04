"""smechvisord on a listen address it cannot use: exit 2 with the address and the way out
(--bind / SMECHVISORD_BIND, BIND= for make run), never a bare `[Errno 98]`."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonEnv


def start(env: DaemonEnv, bind: str) -> subprocess.CompletedProcess[str]:
    variables = env.env()
    variables["SMECHVISORD_BIND"] = bind
    return subprocess.run(
        [sys.executable, "-m", "smechvisord"],
        env=variables,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[DaemonEnv]:
    daemon_env = DaemonEnv(tmp_path / "d")
    yield daemon_env
    daemon_env.cleanup()


def test_a_busy_port_names_the_address_and_the_way_out(env: DaemonEnv) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        proc = start(env, f"127.0.0.1:{port}")

        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1, proc.stderr
        assert errors[0].endswith(
            f"cannot start: cannot listen on 127.0.0.1:{port}: the address is already in use "
            "(another smechvisord, or another service); choose another address with --bind "
            "HOST:PORT or SMECHVISORD_BIND=HOST:PORT (make run: make run BIND=127.0.0.1:8081; "
            "OpenRC: SMECHVISORD_BIND in /etc/conf.d/smechvisord)"
        ), errors[0]
        assert "Errno" not in proc.stderr and "Traceback" not in proc.stderr
        # The holder keeps its port: nothing was taken over.
        assert holder.getsockname()[1] == port


def test_an_address_no_interface_has(env: DaemonEnv) -> None:
    # 192.0.2.0/24 is TEST-NET-1: no interface here has it, and nothing is sent to it.
    proc = start(env, "192.0.2.1:8080")
    assert proc.returncode == 2, proc.stderr
    assert (
        "cannot listen on 192.0.2.1:8080: no network interface of this machine has the "
        "address 192.0.2.1; choose another address with --bind" in proc.stderr
    ), proc.stderr
