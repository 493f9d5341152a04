"""VmManager under concurrency and PID reuse, without a VMM: the spawn is replaced."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from smechvisord import procs
from smechvisord import protocol as p
from smechvisord.errors import ApiError
from smechvisord.host import Host
from smechvisord.settings import load
from smechvisord.validate import VmSpec
from smechvisord.vms import Vm, VmManager, _Runtime, _signal


def manager(tmp_path: Path) -> VmManager:
    cfg = load([], environ={"SMECHVISORD_STATE_DIR": str(tmp_path / "state")})
    return VmManager(cfg, Host(tmp_path))


def stopped_vm(vm_id: str, disk: str) -> Vm:
    return Vm(id=vm_id, uuid=vm_id, cpus=1, memory_mb=256, disk=disk, argv=["ch"], created_at=0.0)


def test_two_starts_on_one_disk_cannot_both_spawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two stopped VMs share a disk (allowed while neither runs). Started at once, each
    passed the disk check before either left `stopped`: two VMMs on one image."""
    vms = manager(tmp_path)
    for name in ("a", "b"):
        vms._vms[name] = stopped_vm(name, "/images/shared.img")
        vms._rt[name] = _Runtime()
    spawned: list[str] = []
    both_checked = threading.Barrier(2, timeout=1)

    def fake_spawn(vm: Vm, rt: _Runtime) -> None:
        spawned.append(vm.id)
        # The real spawn takes a while (exec, vmm.ping); let the other start catch up.
        try:
            both_checked.wait()
        except threading.BrokenBarrierError:
            pass
        vm.state, vm.pid = p.STATE_RUNNING, 1

    monkeypatch.setattr(vms, "preflight", lambda: "/usr/bin/cloud-hypervisor")
    monkeypatch.setattr(vms, "_spawn", fake_spawn)
    monkeypatch.setattr(vms, "_public", lambda vm: {"id": vm.id})
    errors: list[ApiError] = []

    def start(name: str) -> None:
        try:
            vms.action(name, "start", 30)
        except ApiError as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(spawned) == 1, spawned
    assert [e.status for e in errors] == [409]
    assert "in use by VM" in errors[0].message


def test_signal_spares_a_process_that_reused_the_pid() -> None:
    """The ladder's SIGTERM/SIGKILL go to the VMM that was recorded, not to whatever
    process holds its PID by now (a re-adopted VMM is reaped by init, not by us)."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        st = procs.stat(other.pid)
        assert st is not None
        with pytest.raises(ProcessLookupError):
            _signal(other.pid, st.start_ticks + 1, signal.SIGKILL)
        time.sleep(0.05)
        assert other.poll() is None
        _signal(other.pid, st.start_ticks, signal.SIGKILL)
        assert other.wait(timeout=5) == -signal.SIGKILL
    finally:
        other.kill()
        other.wait()


def test_monitor_does_not_race_an_action(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitor pass owns a VM only while it holds the VM's action lock."""
    vms = manager(tmp_path)
    vm = stopped_vm("m", "/images/m.img")
    vm.state, vm.pid = p.STATE_RUNNING, 999_999_999
    vms._vms["m"], vms._rt["m"] = vm, _Runtime()
    seen: list[Any] = []
    monkeypatch.setattr(vms, "_mark_exited", lambda *a, **k: seen.append(a))
    with vms._rt["m"].action:
        vms.poll_once()
    assert seen == []
    vms.poll_once()
    assert len(seen) == 1


def test_failed_create_leaves_no_vmm_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VMM is running but its record cannot be written (a full disk): create fails
    and forgets the VM, so it must end (and reap) the VMM it started."""
    fake_ch = tmp_path / "fake-ch"
    fake_ch.write_text("#!/bin/sh\nexec sleep 30\n")
    fake_ch.chmod(0o755)
    vms = manager(tmp_path)
    vms.settings.records_dir.mkdir(parents=True)
    monkeypatch.setattr(vms, "preflight", lambda: str(fake_ch))
    real_persist = vms._persist
    started: list[int] = []

    def persist(vm: Vm) -> None:
        if vm.pid is not None:
            started.append(vm.pid)
            raise OSError(28, "No space left on device")
        real_persist(vm)

    monkeypatch.setattr(vms, "_persist", persist)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 512)
    spec = VmSpec(cpus=1, memory_mb=256, disk=disk, name="full", dry_run=False)
    with pytest.raises(OSError):
        vms.create(spec)
    assert started
    assert not Path(f"/proc/{started[0]}").exists()  # killed and reaped
    assert vms._vms == {}
