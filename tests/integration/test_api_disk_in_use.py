"""One disk, one VMM: a VM is not created on, nor started from, a disk that a VMM
smechvisord did not start (hand-started, unmanaged) has open. GET /api/images already
said such a disk was in use; POST /api/vms booted a second VMM on it anyway, and two
guests writing one image corrupt it."""

from __future__ import annotations

import os

from tests.support.daemon import Daemon, DaemonEnv, wait_for
from tests.support.vmhelpers import create_vm, foreign_vmm, managed_vms


def _foreign_seen(d: Daemon, pid: int) -> bool:
    return any(vm["pid"] == pid and not vm["managed"] for vm in d.get("/api/vms").json)


def test_create_refuses_a_disk_an_unmanaged_vmm_has_open(
    daemon: Daemon, daemon_env: DaemonEnv
) -> None:
    with foreign_vmm(daemon_env) as proc:
        assert wait_for(lambda: _foreign_seen(daemon, proc.pid), timeout=10)
        r = daemon.post("/api/vms", {"cpus": 1, "memory_mb": 512, "disk": str(daemon_env.disk)})
        assert r.status == 409, r.json
        assert r.json["error"]["message"] == (
            f"{daemon_env.disk} is in use by VM pid-{proc.pid} (as {daemon_env.disk})"
        )
        # The same file under another name (a hard link) is the same disk.
        link = daemon_env.images / "link.img"
        os.link(daemon_env.disk, link)
        r = daemon.post("/api/vms", {"cpus": 1, "memory_mb": 512, "disk": str(link)})
        assert r.status == 409, r.json
        assert managed_vms(daemon) == []


def test_start_refuses_a_disk_an_unmanaged_vmm_has_open(
    daemon: Daemon, daemon_env: DaemonEnv
) -> None:
    vm = create_vm(daemon, daemon_env, name="web-1")
    assert daemon.post("/api/vms/web-1/stop", {}).status == 200
    with foreign_vmm(daemon_env) as proc:
        assert wait_for(lambda: _foreign_seen(daemon, proc.pid), timeout=10)
        r = daemon.post("/api/vms/web-1/start", {})
        assert r.status == 409, r.json
        assert f"in use by VM pid-{proc.pid}" in r.json["error"]["message"]
        assert daemon.get("/api/vms/web-1").json["state"] == "stopped"
    # Once that VMM is gone the disk is free again (after the daemon's 2 s scan cache).
    assert wait_for(lambda: not _foreign_seen(daemon, proc.pid), timeout=10)
    r = daemon.post("/api/vms/web-1/start", {})
    assert r.status == 200, r.json
    assert r.json["id"] == vm["id"]


def test_a_dry_run_names_the_vm_that_has_the_disk(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    # A dry run said nothing would stop it; the real create then answered 409.
    create_vm(daemon, daemon_env, name="web-1")
    body = {"cpus": 1, "memory_mb": 512, "disk": str(daemon_env.disk), "dry_run": True}
    r = daemon.post("/api/vms", {**body, "name": "web-2"})
    assert r.status == 200, r.json
    assert r.json["problems"] == [f"{daemon_env.disk} is in use by VM web-1 (as {daemon_env.disk})"]
    r = daemon.post("/api/vms", {**body, "name": "web-1"})
    assert r.json["problems"] == [
        "a VM named 'web-1' already exists",
        f"{daemon_env.disk} is in use by VM web-1 (as {daemon_env.disk})",
    ]
