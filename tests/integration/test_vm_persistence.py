"""VMs outlive the daemon: kill -9 it, restart it, and the same VMs come back."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.support.daemon import Daemon, DaemonEnv, wait_for
from tests.support.vmhelpers import create_vm, foreign_vmm, managed_vms, pid_alive


def test_kill_9_and_restart_readopts_the_same_vms(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    d = Daemon(env)
    a = create_vm(d, env, name="alpha")
    b = create_vm(d, env, name="beta", disk=str(env.make_image("b.img")))
    c = create_vm(d, env, name="gamma", disk=str(env.make_image("c.img")))
    assert d.post("/api/vms/gamma/pause").json["state"] == "paused"
    d.stop(signal.SIGKILL)
    assert pid_alive(a["pid"]) and pid_alive(b["pid"])

    # While the daemon is down, one VM's process dies.
    os.kill(b["pid"], signal.SIGKILL)
    assert wait_for(lambda: not pid_alive(b["pid"]))

    d2 = Daemon(env)
    try:
        vms = {v["id"]: v for v in managed_vms(d2)}
        assert set(vms) == {"alpha", "beta", "gamma"}
        assert vms["alpha"]["pid"] == a["pid"]
        assert vms["alpha"]["state"] == "running"
        assert vms["gamma"]["pid"] == c["pid"]
        assert vms["gamma"]["state"] == "paused"
        assert vms["beta"]["state"] == "failed"
        assert vms["beta"]["pid"] is None
        assert vms["beta"]["exit"]["reason"] == "the VMM exited while smechvisord was not running"
        # Adopted VMs stay fully manageable.
        r = d2.post("/api/vms/gamma/resume")
        assert r.json["state"] == "running"
        r = d2.post("/api/vms/alpha/shutdown", {"timeout_seconds": 10})
        assert r.status == 200 and r.json["state"] == "stopped"
        assert not pid_alive(a["pid"])
        # An adopted VMM that exits is noticed by the monitor although it is not our child.
        os.kill(c["pid"], signal.SIGKILL)
        doc = wait_for(lambda: (v := d2.get("/api/vms/gamma").json)["state"] == "failed" and v)
        assert doc["exit"]["code"] is None
    finally:
        d2.stop()


def test_sigterm_leaves_vms_running(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    d = Daemon(env)
    vm = create_vm(d, env, name="keeper")
    assert d.stop(signal.SIGTERM) == 0
    assert pid_alive(vm["pid"])
    assert any("stopped; 1 VMs left running" in line for line in d.lines)
    record = json.loads((env.state_dir / "machines" / "keeper" / "record.json").read_text())
    assert record["pid"] == vm["pid"] and record["state"] == "running"
    d2 = Daemon(env)
    try:
        assert d2.get("/api/vms/keeper").json["pid"] == vm["pid"]
    finally:
        d2.stop()


def test_crash_between_record_and_pid_is_recovered(daemon_env: DaemonEnv) -> None:
    """A record written as `starting` with no PID (the daemon died mid-spawn) is matched to
    its VMM by the API socket path on the next start."""
    env = daemon_env
    d = Daemon(env)
    vm = create_vm(d, env, name="orphan")
    d.stop(signal.SIGKILL)
    path = env.state_dir / "machines" / "orphan" / "record.json"
    record = json.loads(path.read_text())
    record.update(pid=None, pid_start=None, state="starting")
    path.write_text(json.dumps(record))
    (path.parent / ".record.json.abc.tmp").write_text("{half")  # a torn write
    d2 = Daemon(env)
    try:
        doc = d2.get("/api/vms/orphan").json
        assert doc["pid"] == vm["pid"]
        assert doc["state"] == "running"
        assert not (path.parent / ".record.json.abc.tmp").exists()
    finally:
        d2.stop()


def test_corrupt_record_does_not_stop_the_daemon(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    bad = env.state_dir / "machines" / "broken"
    bad.mkdir(parents=True)
    (bad / "record.json").write_text("{not json")
    d = Daemon(env)
    try:
        # Listed as broken (so an operator sees it), never as a VM the daemon runs.
        assert [(v["id"], v["state"]) for v in managed_vms(d)] == [("broken", "broken")]
        assert any("skipping unreadable VM record" in line for line in d.lines)
    finally:
        d.stop()


def test_foreign_vmm_is_listed_unmanaged(
    daemon: Daemon, daemon_env: DaemonEnv, tmp_path: Path
) -> None:
    with foreign_vmm(daemon_env) as proc:

        def foreign() -> list[dict[str, object]]:
            listed = daemon.get("/api/vms").json
            return [v for v in listed if not v["managed"] and v["pid"] == proc.pid]

        found = wait_for(foreign, timeout=5)
        assert len(found) == 1
        assert found[0]["cpus"] == 3
        assert found[0]["memory_mb"] == 2048
        assert found[0]["id"] == f"pid-{proc.pid}"
