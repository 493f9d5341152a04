"""Small helpers the VM tests share."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.daemon import STANDIN, Daemon, DaemonEnv, wait_for


def create_vm(d: Daemon, env: DaemonEnv, **extra: Any) -> dict[str, Any]:
    body = {"cpus": 2, "memory_mb": 512, "disk": str(env.disk), **extra}
    r = d.post("/api/vms", body)
    assert r.status == 201, r.json
    return dict(r.json)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def managed_vms(d: Daemon) -> list[dict[str, Any]]:
    """The daemon's own VMs; VMMs of other tests on this machine show up as unmanaged."""
    return [v for v in d.get("/api/vms").json if v["managed"]]


@contextlib.contextmanager
def foreign_vmm(env: DaemonEnv) -> Iterator[subprocess.Popen[bytes]]:
    """A cloud-hypervisor started by hand, not by the daemon (3 vCPUs, 2 GiB). Its socket
    is in the test's run dir, so kill_vmms also cleans it up should this not."""
    sock = env.run_dir / "byhand.sock"
    argv = [
        str(STANDIN), "--api-socket", f"path={sock}", "--cpus", "boot=3",
        "--memory", "size=2G", "--firmware", str(env.firmware), "--disk", f"path={env.disk}",
        "--console", "off", "--serial", "null",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        env={**os.environ, "CH_STANDIN_SYSROOT": str(env.sysroot)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not wait_for(sock.exists):
            raise RuntimeError("the hand-started VMM did not create its API socket")
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=5)
