"""Every documented read-only endpoint, with its exact keys, against each fixture sysroot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, DaemonEnv, kill_vmms
from tests.support.schemas import DOCUMENTED_NODE_KEYS, IOMMU_KEYS, NODE_KEYS, PCI_KEYS
from tests.support.sysroots import EXPECTED, KINDS
from tests.support.vmhelpers import managed_vms


@pytest.fixture(scope="module", params=KINDS)
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Daemon]]:
    kind = request.param
    env = DaemonEnv(tmp_path_factory.mktemp(kind), kind=kind)
    d = Daemon(env)
    yield kind, d
    d.stop()
    kill_vmms(env.run_dir)
    env.cleanup()


def test_health_needs_no_token(node: tuple[str, Daemon]) -> None:
    _, d = node
    r = d.get("/api/health", token=None)
    assert r.status == 200
    # The PID lets the OTA probation notice a daemon that keeps restarting.
    assert r.json == {"status": "ok", "version": "0.1.0", "pid": d.proc.pid}


def test_node_document(node: tuple[str, Daemon]) -> None:
    kind, d = node
    want = EXPECTED[kind]
    r = d.get("/api/node")
    assert r.status == 200
    doc = r.json
    assert set(doc) == NODE_KEYS
    assert set(doc) >= DOCUMENTED_NODE_KEYS
    for key in (
        "cpu_model",
        "cpu_cores",
        "cpu_threads",
        "memory_total_mb",
        "memory_used_mb",
        "uptime_seconds",
        "kvm_available",
        "hostname",
        "kernel",
        "load_average",
        "boot_mode",
        "iommu_ready",
        "vfio_loaded",
    ):
        assert doc[key] == want[key], key
    assert isinstance(doc["cpu_cores"], int) and not isinstance(doc["cpu_cores"], bool)
    assert doc["vms_running"] == 0
    assert doc["vmm"]["available"] is True
    assert doc["vmm"]["version"] == "v42.0"
    caps = doc["capabilities"]
    assert caps["create_vm"] is want["kvm_available"]
    assert caps["vfio"] is want["iommu_ready"]
    assert caps["reboot_uefi"] is want["boot_to_firmware_supported"]
    assert (doc["capability_reasons"]["reboot_uefi"] == "") is caps["reboot_uefi"]


def test_iommu_lists_exactly_the_failing_checks(node: tuple[str, Daemon]) -> None:
    kind, d = node
    want = EXPECTED[kind]
    doc = d.get("/api/iommu").json
    assert set(doc) == IOMMU_KEYS
    assert doc["ready"] is want["iommu_ready"]
    failing = [c["id"] for c in doc["checks"] if not c["ok"]]
    assert failing == want["failing_checks"]
    assert len(doc["blockers"]) == len(failing)
    assert [c["id"] for c in doc["checks"]] == [
        "cpu_virtualization",
        "iommu_groups",
        "kernel_cmdline",
    ]
    assert doc["iommu_groups"] == want["iommu_groups"]
    assert doc["cmdline_flags"] == want["cmdline_flags"]
    assert doc["cpu_virtualization"] == want["cpu_virtualization"]


def test_pci_listing(node: tuple[str, Daemon]) -> None:
    kind, d = node
    want = EXPECTED[kind]["pci"]
    assert isinstance(want, dict)
    devices = d.get("/api/pci").json
    assert [dev["address"] for dev in devices] == sorted(want)
    for dev in devices:
        assert set(dev) == PCI_KEYS
        expected = want[dev["address"]]
        assert isinstance(expected, dict)
        for key, value in expected.items():
            assert dev[key] == value, (dev["address"], key)
        assert (dev["reasons"] == []) is dev["viable"]


def test_vms_starts_empty_and_images_are_listed(node: tuple[str, Daemon]) -> None:
    _, d = node
    assert managed_vms(d) == []
    images = d.get("/api/images").json
    assert [i["name"] for i in images] == ["disk.img"]
    assert images[0]["size_bytes"] == 1 << 20


def test_reboot_support_and_vfio_status(node: tuple[str, Daemon]) -> None:
    kind, d = node
    want = EXPECTED[kind]
    support = d.get("/api/reboot-uefi").json
    assert support["supported"] is want["boot_to_firmware_supported"]
    vfio = d.get("/api/vfio").json
    assert vfio == {
        "loaded": want["vfio_loaded"],
        "ready": want["iommu_ready"],
        "blockers": d.get("/api/iommu").json["blockers"],
    }


def test_dashboard_page_with_security_headers(node: tuple[str, Daemon]) -> None:
    _, d = node
    r = d.get("/", token=None)
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert b"SmechVisor" in r.raw
    assert d.get("/../../etc/passwd", token=None).status == 404
    assert d.get("/%2e%2e/%2e%2e/etc/passwd", token=None).status == 404


def test_token_file_is_private(node: tuple[str, Daemon]) -> None:
    _, d = node
    mode = Path(d.env.token_file).stat().st_mode & 0o777
    assert mode == 0o600
    assert len(d.token) >= 32


def test_unreadable_host_file_is_a_json_500_naming_it(tmp_path: Path) -> None:
    env = DaemonEnv(tmp_path)
    (env.sysroot / "proc" / "meminfo").unlink()
    d = Daemon(env)
    try:
        r = d.get("/api/node")
        assert r.status == 500
        assert r.error_code == "internal_error"
        assert "meminfo" in r.json["error"]["message"]
        assert d.get("/api/health").status == 200
    finally:
        d.stop()
        env.cleanup()


@pytest.mark.parametrize("missing", ["vmm", "firmware"])
def test_create_vm_false_names_its_reason(tmp_path: Path, missing: str) -> None:
    """A node without cloud-hypervisor (an image built without --vmm) or without the VM
    firmware says it cannot create VMs, and why, in capability_reasons."""
    env = DaemonEnv(tmp_path, kind="intel-ready")
    if missing == "vmm":
        env.extra_env["SMECHVISORD_CH_BIN"] = str(tmp_path / "no-such-cloud-hypervisor")
    else:
        env.extra_env["SMECHVISORD_FIRMWARE"] = str(tmp_path / "no-such-CLOUDHV.fd")
    d = Daemon(env)
    try:
        doc = d.get("/api/node").json
    finally:
        d.stop()
        env.cleanup()
    assert doc["kvm_available"] is True  # the fixture has /dev/kvm: only the VMM side is missing
    assert doc["capabilities"]["create_vm"] is False
    reason = doc["capability_reasons"]["create_vm"]
    assert ("cloud-hypervisor" if missing == "vmm" else "firmware") in reason
    assert ("no-such-cloud-hypervisor" if missing == "vmm" else "no-such-CLOUDHV.fd") in reason


def test_create_vm_reason_empty_when_possible(node: tuple[str, Daemon]) -> None:
    _, d = node
    doc = d.get("/api/node").json
    caps, reasons = doc["capabilities"], doc["capability_reasons"]
    assert (reasons["create_vm"] == "") is caps["create_vm"]
    if not caps["create_vm"]:
        assert "/dev/kvm" in reasons["create_vm"]
