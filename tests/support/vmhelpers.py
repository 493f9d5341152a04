"""Small helpers the VM tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.daemon import Daemon, DaemonEnv


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
