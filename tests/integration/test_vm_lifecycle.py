"""VM lifecycle against the cloud-hypervisor stand-in: create, pause, resume, graceful
shutdown with escalation, delete; the 503s for a missing VMM or KVM."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, DaemonEnv, wait_for
from tests.support.unixhttp import call
from tests.support.vmhelpers import create_vm as create
from tests.support.vmhelpers import managed_vms, pid_alive


def test_full_lifecycle(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    d, env = daemon, daemon_env
    vm = create(d, env, name="web-1")
    assert vm["id"] == "web-1"
    assert vm["state"] == "running"
    assert vm["managed"] is True
    pid = vm["pid"]
    assert isinstance(pid, int) and pid_alive(pid)
    # The argv the design asks for, read back from the kernel.
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    text = [a.decode() for a in argv]
    assert "--console" in text and text[text.index("--console") + 1] == "off"
    assert text[text.index("--cpus") + 1] == "boot=2"
    assert text[text.index("--memory") + 1] == "size=512M"
    assert text[text.index("--firmware") + 1] == str(env.firmware)
    assert text[text.index("--platform") + 1] == f"uuid={vm['uuid']}"
    assert text[text.index("--serial") + 1].startswith("file=")
    # VMs live in their own session, so signals to the daemon's group do not reach them.
    assert os.getsid(pid) == pid

    listed = managed_vms(d)
    assert [v["id"] for v in listed] == ["web-1"]
    assert listed[0]["pid"] == pid
    assert listed[0]["cpus"] == 2 and listed[0]["memory_mb"] == 512
    assert isinstance(listed[0]["cpu_percent"], float)
    assert listed[0]["rss_mb"] > 0
    assert d.get("/api/node").json["vms_running"] == 1

    r = d.post("/api/vms/web-1/pause")
    assert r.status == 200 and r.json["state"] == "paused"
    assert d.post("/api/vms/web-1/pause").status == 409  # already paused
    r = d.post("/api/vms/web-1/resume")
    assert r.status == 200 and r.json["state"] == "running"
    r = d.post("/api/vms/web-1/reboot")
    assert r.status == 200 and r.json["state"] == "running"
    assert r.json["pid"] == pid  # a reboot stays inside the same VMM process

    console = d.get("/api/vms/web-1/console").json
    assert "login:" in console["data"]
    assert console["next_offset"] == console["size"] > 0
    later = d.get(f"/api/vms/web-1/console?offset={console['next_offset']}").json
    assert later["data"] == ""

    # Delete refuses a running VM.
    r = d.request("DELETE", "/api/vms/web-1")
    assert r.status == 409 and r.error_code == "conflict"

    r = d.post("/api/vms/web-1/shutdown", {"timeout_seconds": 10})
    assert r.status == 200, r.json
    assert r.json["state"] == "stopped"
    assert r.json["pid"] is None
    steps = r.json["last_shutdown"]["steps"]
    assert [s["step"] for s in steps] == ["vm.power-button"]
    assert steps[0]["exited"] is True
    assert r.json["exit"]["code"] == 0
    assert not pid_alive(pid)
    assert not (env.run_dir / "web-1.sock").exists()

    # A stopped VM starts again from its record.
    r = d.post("/api/vms/web-1/start")
    assert r.status == 200 and r.json["state"] == "running"
    new_pid = r.json["pid"]
    r = d.post("/api/vms/web-1/stop")
    assert r.status == 200 and r.json["state"] == "stopped"
    assert not pid_alive(new_pid)

    r = d.request("DELETE", "/api/vms/web-1")
    assert r.status == 200 and r.json == {"deleted": "web-1"}
    assert managed_vms(d) == []
    assert d.get("/api/vms/web-1").status == 404
    assert not (env.state_dir / "machines" / "web-1").exists()


@pytest.mark.parametrize("daemon_env", ["intel-ready"], indirect=True)
def test_shutdown_escalates_when_the_guest_ignores_the_button(daemon_env: DaemonEnv) -> None:
    daemon_env.extra_env["CH_STANDIN_IGNORE_POWER_BUTTON"] = "1"
    d = Daemon(daemon_env)
    try:
        vm = create(d, daemon_env)
        r = d.post(f"/api/vms/{vm['id']}/shutdown", {"timeout_seconds": 1})
        assert r.status == 200
        steps = r.json["last_shutdown"]["steps"]
        assert [s["step"] for s in steps] == ["vm.power-button", "vm.shutdown+vmm.shutdown"]
        assert [s["exited"] for s in steps] == [False, True]
        assert r.json["state"] == "stopped"
        assert not pid_alive(vm["pid"])
    finally:
        d.stop()


def test_generated_id_dry_run_and_duplicates(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    d, env = daemon, daemon_env
    r = d.post(
        "/api/vms",
        {"cpus": 1, "memory_mb": 256, "disk": str(env.disk), "name": "a", "dry_run": True},
    )
    assert r.status == 200
    argv = r.json["argv"]
    assert r.json["problems"] == []
    assert argv[argv.index("--cpus") + 1] == "boot=1"
    assert argv[argv.index("--disk") + 1] == f"path={env.disk}"
    assert argv.count("--disk") == 1
    assert managed_vms(d) == []  # nothing spawned
    vm = create(d, env)
    assert vm["id"].startswith("vm-")
    # The same disk cannot back two running VMs.
    other = env.make_image("other.img")
    r = d.post("/api/vms", {"cpus": 1, "memory_mb": 256, "disk": str(env.disk), "name": "b"})
    assert r.status == 409 and r.json["error"]["details"]["field"] == "disk"
    create(d, env, name="b", disk=str(other))
    r = d.post("/api/vms", {"cpus": 1, "memory_mb": 256, "disk": str(other), "name": "b"})
    assert r.status == 409 and r.json["error"]["details"]["field"] == "name"


def test_vm_that_crashes_shows_failed(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    d, env = daemon, daemon_env
    vm = create(d, env, name="crashy")
    os.kill(vm["pid"], signal.SIGKILL)
    doc = wait_for(lambda: (v := d.get("/api/vms/crashy").json)["state"] == "failed" and v)
    assert doc["exit"]["signal"] == 9
    assert doc["exit"]["code"] is None
    assert doc["pid"] is None
    assert isinstance(doc["exit"]["log_tail"], list)


def test_guest_power_off_from_inside_shows_stopped(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    d, env = daemon, daemon_env
    vm = create(d, env, name="quitter")
    os.kill(vm["pid"], signal.SIGTERM)  # v42 handles SIGTERM as a clean VMM shutdown
    doc = wait_for(lambda: (v := d.get("/api/vms/quitter").json)["state"] != "running" and v)
    assert doc["state"] == "stopped"
    assert doc["exit"]["code"] == 0


def test_missing_vmm_is_a_503_that_says_what_to_do(daemon_env: DaemonEnv) -> None:
    daemon_env.extra_env["SMECHVISORD_CH_BIN"] = "/nonexistent/cloud-hypervisor"
    d = Daemon(daemon_env)
    try:
        r = d.post("/api/vms", {"cpus": 1, "memory_mb": 256, "disk": str(daemon_env.disk)})
        assert r.status == 503
        assert r.error_code == "vmm_unavailable"
        assert "SMECHVISORD_CH_BIN" in r.json["error"]["message"]
        assert managed_vms(d) == []
        node = d.get("/api/node").json
        assert node["vmm"]["available"] is False
        assert node["capabilities"]["create_vm"] is False
    finally:
        d.stop()


@pytest.mark.parametrize("daemon_env", ["vm-guest"], indirect=True)
def test_no_kvm_in_sysroot_is_a_503(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    r = daemon.post("/api/vms", {"cpus": 1, "memory_mb": 256, "disk": str(daemon_env.disk)})
    assert r.status == 503
    assert r.error_code == "kvm_unavailable"
    assert "/dev/kvm" in r.json["error"]["message"]
    assert managed_vms(daemon) == []


def test_vmm_failing_on_kvm_includes_its_stderr(daemon_env: DaemonEnv, tmp_path: Path) -> None:
    # The daemon's sysroot has /dev/kvm; the VMM's view does not (e.g. a permissions race).
    no_kvm = tmp_path / "vmm-root"
    no_kvm.mkdir()
    daemon_env.extra_env["CH_STANDIN_SYSROOT"] = str(no_kvm)
    d = Daemon(daemon_env)
    try:
        r = d.post("/api/vms", {"cpus": 1, "memory_mb": 256, "disk": str(daemon_env.disk)})
        assert r.status == 503
        assert r.error_code == "kvm_unavailable"
        tail = r.json["error"]["details"]["stderr_tail"]
        assert any("Failed to open hypervisor interface" in line for line in tail)
        assert r.json["error"]["details"]["exit_code"] == 1
        assert managed_vms(d) == []  # create is all or nothing
        assert list((daemon_env.state_dir / "machines").iterdir()) == []
    finally:
        d.stop()


def test_vmm_boot_failure_is_a_502_with_stderr(daemon_env: DaemonEnv) -> None:
    daemon_env.extra_env["CH_STANDIN_BOOT_FAIL"] = "injected firmware fault"
    d = Daemon(daemon_env)
    try:
        r = d.post("/api/vms", {"cpus": 1, "memory_mb": 256, "disk": str(daemon_env.disk)})
        assert r.status == 502
        assert r.error_code == "vmm_failed"
        assert any(
            "injected firmware fault" in line for line in r.json["error"]["details"]["stderr_tail"]
        )
    finally:
        d.stop()


def test_pause_by_another_tool_is_noticed(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    """Someone pauses the VM straight on its VMM socket (as ch-remote would): the daemon
    learns it from the event monitor, without being asked for that VM."""
    vm = create(daemon, daemon_env, name="elsewhere")
    reply = call(vm["api_socket"], "PUT", "/api/v1/vm.pause")
    assert reply.status == 204

    def listed_state() -> str:
        return str(next(v for v in managed_vms(daemon) if v["id"] == "elsewhere")["state"])

    assert wait_for(lambda: listed_state() == "paused", timeout=5)
    call(vm["api_socket"], "PUT", "/api/v1/vm.resume")
    assert wait_for(lambda: listed_state() == "running", timeout=5)


def test_vm_shutdown_by_another_tool_ends_the_vmm(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    """`ch-remote shutdown` stops the guest but v42 keeps the VMM process. A stopped VM
    must not keep a VMM: a later start would spawn a second VMM on the same disk and
    socket, and the first one would be left behind (never reaped: a zombie when it
    exits), and DELETE would forget a VMM that still runs."""
    vm = create(daemon, daemon_env, name="remote-off")
    old_pid = vm["pid"]
    reply = call(vm["api_socket"], "PUT", "/api/v1/vm.shutdown")
    assert reply.status == 204

    doc = wait_for(
        lambda: (v := daemon.get("/api/vms/remote-off").json)["state"] == "stopped" and v,
        timeout=10,
    )
    assert doc, daemon.get("/api/vms/remote-off").json
    assert doc["pid"] is None
    # Ended and reaped: no process, not even a zombie, is left under that PID.
    assert wait_for(lambda: not os.path.exists(f"/proc/{old_pid}"), timeout=10)

    r = daemon.post("/api/vms/remote-off/start")
    assert r.status == 200, r.json
    assert r.json["state"] == "running"
    vmm_pids = [
        int(n)
        for n in os.listdir("/proc")
        if n.isdigit() and pid_alive(int(n)) and _has_socket_arg(int(n), vm["api_socket"])
    ]
    assert vmm_pids == [r.json["pid"]]


def _has_socket_arg(pid: int, sock: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"path={sock}".encode() in argv
