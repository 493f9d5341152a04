from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, DaemonEnv, kill_vmms
from tests.support.ota_pki import Node, Pki, make_node
from tests.support.sshd import Sshd, start_sshd


@pytest.fixture
def daemon_env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DaemonEnv]:
    kind = getattr(request, "param", "intel-ready")
    env = DaemonEnv(tmp_path, kind=kind)
    yield env
    kill_vmms(env.run_dir)
    env.cleanup()


@pytest.fixture
def daemon(daemon_env: DaemonEnv) -> Iterator[Daemon]:
    d = Daemon(daemon_env)
    yield d
    d.stop()


@pytest.fixture
def ota_pki() -> Pki:
    """Fresh root, release and channel keys."""
    return Pki()


@pytest.fixture
def ota_node(tmp_path: Path, ota_pki: Pki) -> Node:
    """An OTA node sysroot under tmp_path that trusts ota_pki's root."""
    return make_node(tmp_path, ota_pki)


@pytest.fixture
def sshd() -> Iterator[Sshd]:
    """A real OpenSSH sshd on 127.0.0.1 (a module may define its own, e.g. chrooted)."""
    # Imported here: the SSH transport pulls in paramiko, which most tests never need.
    from spk_visor.transport import ssh  # noqa: PLC0415

    server = start_sshd()
    yield server
    # Pooled connections first, so sshd's per-connection children exit on their own.
    ssh.close_all()
    server.stop()
