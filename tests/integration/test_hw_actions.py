"""reboot-uefi and vfio against fixture sysroots, with recording stand-ins for the
reboot command and modprobe."""

from __future__ import annotations

import struct

import pytest

from tests.support.daemon import Daemon, DaemonEnv
from tests.support.sysroots import EFI_GLOBAL
from tests.support.vmhelpers import create_vm, pid_alive

OS_INDICATIONS = f"sys/firmware/efi/efivars/OsIndications-{EFI_GLOBAL}"


def test_reboot_uefi_writes_os_indications_stops_vms_and_reboots_once(
    daemon: Daemon, daemon_env: DaemonEnv
) -> None:
    env = daemon_env
    var = env.sysroot / OS_INDICATIONS
    before = var.read_bytes()
    assert before == struct.pack("<IQ", 7, 0x4)  # the fixture: another bit already set
    vm = create_vm(daemon, env, name="guest")
    r = daemon.post("/api/reboot-uefi", {"confirm": True})
    assert r.status == 202, r.json
    # 07 00 00 00, then 0x4 | 0x1 little-endian: the other bit preserved.
    assert var.read_bytes() == bytes.fromhex("070000000500000000000000")
    assert r.json["os_indications"] == {"previous": 4, "value": 5, "written": True}
    assert [argv[1:] for argv in env.recorded()] == [["reboot"]]
    assert r.json["vms"] == [{"id": "guest", "state": "stopped"}]
    assert not pid_alive(vm["pid"])
    steps = daemon.get("/api/vms/guest").json["last_shutdown"]["steps"]
    assert steps[0]["step"] == "vm.power-button"


@pytest.mark.parametrize("daemon_env", ["amd-no-iommu", "bios-host", "vm-guest"], indirect=True)
def test_reboot_uefi_refused_without_firmware_support(
    daemon: Daemon, daemon_env: DaemonEnv
) -> None:
    r = daemon.post("/api/reboot-uefi", {"confirm": True})
    assert r.status == 409
    assert r.error_code == "unsupported"
    assert r.json["error"]["message"]
    assert daemon_env.recorded() == []
    efivars = daemon_env.sysroot / "sys/firmware/efi/efivars"
    if efivars.exists():
        assert not (efivars / f"OsIndications-{EFI_GLOBAL}").exists() or (
            efivars / f"OsIndications-{EFI_GLOBAL}"
        ).read_bytes()[4:] != struct.pack("<Q", 1)


def test_reboot_command_failure_is_reported(daemon_env: DaemonEnv) -> None:
    daemon_env.extra_env["RECORD_EXIT"] = "1"
    daemon_env.extra_env["RECORD_STDERR"] = "reboot: must be superuser"
    d = Daemon(daemon_env)
    try:
        r = d.post("/api/reboot-uefi", {"confirm": True})
        assert r.status == 500
        assert r.error_code == "command_failed"
        assert "must be superuser" in r.json["error"]["message"]
        # No reboot happened: the firmware-setup request is withdrawn, so the next
        # reboot (an OTA update, a power cut) does not strand the node in setup.
        var = daemon_env.sysroot / OS_INDICATIONS
        assert var.read_bytes() == struct.pack("<IQ", 7, 0x4)
        assert r.json["error"]["details"]["withdrawn"] is True
    finally:
        d.stop()


@pytest.mark.parametrize("daemon_env", ["amd-no-iommu"], indirect=True)
def test_vfio_refused_while_iommu_not_ready(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    r = daemon.post("/api/vfio", {"enable": True})
    assert r.status == 409
    assert r.error_code == "iommu_not_ready"
    blockers = r.json["error"]["details"]["blockers"]
    assert len(blockers) == 1 and "IOMMU groups" in blockers[0]
    assert daemon_env.recorded() == []


def test_vfio_runs_modprobe(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    r = daemon.post("/api/vfio", {"enable": True})
    assert r.status == 200, r.json
    assert r.json["enabled"] is True
    # Not loaded (per the sysroot): disabling is a no-op, not a failing `modprobe -r`.
    r = daemon.post("/api/vfio", {"enable": False})
    assert r.status == 200 and r.json["command"] is None
    (daemon_env.sysroot / "sys/module/vfio_pci").mkdir(parents=True)
    r = daemon.post("/api/vfio", {"enable": False})
    assert r.status == 200 and r.json["enabled"] is False
    assert [argv[1:] for argv in daemon_env.recorded()] == [["vfio-pci"], ["-r", "vfio-pci"]]


def test_vfio_modprobe_failure_is_reported(daemon_env: DaemonEnv) -> None:
    daemon_env.extra_env["RECORD_EXIT"] = "1"
    daemon_env.extra_env["RECORD_STDERR"] = "modprobe: FATAL: Module vfio-pci not found"
    d = Daemon(daemon_env)
    try:
        r = d.post("/api/vfio", {"enable": True})
        assert r.status == 500
        assert r.error_code == "command_failed"
        assert "not found" in r.json["error"]["message"]
    finally:
        d.stop()
