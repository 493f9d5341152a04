"""smechvisord.pci: the device list, host-critical detection and passthrough viability."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smechvisord.host import Host, HostError
from smechvisord.pci import class_name, host_critical, list_devices, pci_device
from tests.support import sysroots
from tests.support.schemas import PCI_KEYS
from tests.support.sysroots import EXPECTED, KINDS


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _root(kind: str, tmp_path: Path) -> Path:
    return sysroots.build(kind, tmp_path / kind)


def _by_address(root: Path) -> dict[str, dict[str, object]]:
    return {str(d["address"]): d for d in list_devices(Host(root))}


# -- every kind ---------------------------------------------------------------------------


def test_every_device_sorted_with_exact_keys(kind: str, tmp_path: Path) -> None:
    devices = list_devices(Host(_root(kind, tmp_path)))
    expected = EXPECTED[kind]["pci"]
    assert isinstance(expected, dict)
    assert [d["address"] for d in devices] == sorted(expected)
    for device in devices:
        assert set(device) == PCI_KEYS


def test_device_facts_match_expected(kind: str, tmp_path: Path) -> None:
    devices = _by_address(_root(kind, tmp_path))
    expected = EXPECTED[kind]["pci"]
    assert isinstance(expected, dict)
    for address, want in expected.items():
        got = {key: devices[address][key] for key in want}
        assert got == want, address


def test_reasons_explain_every_non_viable_device(kind: str, tmp_path: Path) -> None:
    for address, device in _by_address(_root(kind, tmp_path)).items():
        reasons = device["reasons"]
        assert isinstance(reasons, list)
        assert bool(reasons) is (not device["viable"]), address
        assert all(isinstance(r, str) and r for r in reasons)


def test_host_critical_map(kind: str, tmp_path: Path) -> None:
    assert host_critical(Host(_root(kind, tmp_path))) == EXPECTED[kind]["host_critical"]


def test_group_count_matches_iommu(kind: str, tmp_path: Path) -> None:
    devices = list_devices(Host(_root(kind, tmp_path)))
    groups = {d["iommu_group"] for d in devices if d["iommu_group"] is not None}
    assert len(groups) == EXPECTED[kind]["iommu_groups"]


# -- reasons in words ---------------------------------------------------------------------


def test_reasons_on_intel_ready(tmp_path: Path) -> None:
    devices = _by_address(_root("intel-ready", tmp_path))
    assert devices["0000:3b:00.0"]["reasons"] == ["it carries the root filesystem"]
    assert devices["0000:04:00.0"]["reasons"] == ["it carries the management network eno1"]
    # The NIC's second port shares its group: giving it away takes the management port too.
    assert devices["0000:04:00.1"]["reasons"] == [
        "IOMMU group 4 also holds 0000:04:00.0, which carries the management network eno1"
    ]
    assert devices["0000:00:1d.0"]["reasons"] == [
        "it is a PCI bridge: vfio-pci does not bind bridges"
    ]
    # The GPU's group holds its root port; bridges do not block a group.
    assert devices["0000:01:00.0"]["viable"] is True


def test_a_critical_bridge_does_not_block_its_group(tmp_path: Path) -> None:
    # Point the management interface at the root port itself: the bridge stays with the
    # host either way, so the endpoints in its group remain viable.
    root = _root("intel-ready", tmp_path)
    link = root / "sys/devices/pci0000:00/0000:00:1c.0/0000:04:00.0/net/eno1/device"
    link.unlink()
    os.symlink("../../..", link)
    devices = _by_address(root)
    assert devices["0000:00:1c.0"]["host_critical"] == "carries the management network eno1"
    assert devices["0000:04:00.0"]["viable"] is True
    assert devices["0000:04:00.1"]["viable"] is True


def test_no_group_reason(tmp_path: Path) -> None:
    devices = _by_address(_root("amd-no-iommu", tmp_path))
    reasons = devices["0000:41:00.0"]["reasons"]
    assert isinstance(reasons, list)
    assert len(reasons) == 1
    assert reasons[0].startswith("it has no IOMMU group")


# -- lookups ------------------------------------------------------------------------------


def test_pci_device(tmp_path: Path) -> None:
    host = Host(_root("intel-ready", tmp_path))
    gpu = pci_device(host, "0000:01:00.0")
    assert gpu is not None
    assert gpu["class_name"] == "VGA compatible controller"
    assert pci_device(host, "0000:09:00.0") is None
    assert pci_device(host, "../../etc") is None
    assert pci_device(host, "0000:01:00.0/") is None


@pytest.mark.parametrize(
    ("class_id", "name"),
    [
        ("010802", "Non-Volatile memory controller"),
        ("0c0330", "USB controller"),
        ("0c8000", "Serial bus controller"),
        ("060400", "PCI bridge"),
        ("068000", "Bridge"),
        ("120000", "Processing accelerators"),
        ("ff0000", "Unassigned class"),
        ("130000", "Class 1300"),
    ],
)
def test_class_name(class_id: str, name: str) -> None:
    assert class_name(class_id) == name


# -- finding the root disk and the management NIC ----------------------------------------


def test_dev_root_uses_the_cmdline(tmp_path: Path) -> None:
    root = _root("intel-ready", tmp_path)
    (root / "proc/mounts").write_text("/dev/root / ext4 rw 0 0\n")
    assert host_critical(Host(root))["0000:3b:00.0"] == "carries the root filesystem"


def test_dev_root_with_partuuid(tmp_path: Path) -> None:
    root = _root("intel-ready", tmp_path)
    (root / "proc/mounts").write_text("/dev/root / ext4 rw 0 0\n")
    (root / "proc/cmdline").write_text("root=PARTUUID=1234-02 ro intel_iommu=on\n")
    (root / "dev/disk/by-partuuid").mkdir(parents=True)
    os.symlink("../../nvme0n1p2", root / "dev/disk/by-partuuid/1234-02")
    assert "0000:3b:00.0" in host_critical(Host(root))


def test_root_on_tmpfs_protects_no_disk(tmp_path: Path) -> None:
    root = _root("intel-ready", tmp_path)
    (root / "proc/mounts").write_text("tmpfs / tmpfs rw 0 0\n")
    devices = _by_address(root)
    assert devices["0000:3b:00.0"]["host_critical"] is None
    assert devices["0000:3b:00.0"]["viable"] is True


def test_two_default_routes_protect_both(tmp_path: Path) -> None:
    root = _root("intel-ready", tmp_path)
    with (root / "proc/net/route").open("a") as route:
        route.write("eno2\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n")
    critical = host_critical(Host(root))
    assert critical["0000:04:00.1"] == "carries the management network eno2"


def test_interface_names_from_the_route_table_are_checked(tmp_path: Path) -> None:
    root = _root("intel-ready", tmp_path)
    (root / "proc/net/route").write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "..\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\n"
    )
    assert "0000:04:00.0" not in host_critical(Host(root))


@pytest.mark.parametrize("missing", ["proc/mounts", "proc/net/route"])
def test_unknown_critical_devices_refuse_to_answer(tmp_path: Path, missing: str) -> None:
    # Without these, every disk and NIC would look safe to give away.
    root = _root("intel-ready", tmp_path)
    (root / missing).unlink()
    with pytest.raises(HostError, match=missing):
        list_devices(Host(root))


# -- malformed and hostile trees ----------------------------------------------------------


def test_malformed_vendor_is_an_error(tmp_path: Path) -> None:
    root = _root("intel-ready", tmp_path)
    (root / "sys/devices/pci0000:00/0000:00:14.0/vendor").write_text("0xzz\n")
    with pytest.raises(HostError, match="vendor: expected 4 hex digits"):
        list_devices(Host(root))


def test_device_link_cannot_escape_the_sysroot(tmp_path: Path) -> None:
    root = _root("vm-guest", tmp_path / "in")
    outside = tmp_path / "outside-device"
    outside.mkdir()
    for name, value in (("vendor", "0x6666"), ("device", "0x6666"), ("class", "0x020000")):
        (outside / name).write_text(value + "\n")
    escape = "../" * 20 + str(outside.relative_to("/"))
    os.symlink(escape, root / "sys/bus/pci/devices/0000:00:09.0")
    # Contained, the link points at a path that does not exist inside the sysroot.
    with pytest.raises(HostError, match=r"PCI device 0000:00:09\.0: .*class does not exist"):
        list_devices(Host(root))


def test_absolute_driver_link_is_rerooted(tmp_path: Path) -> None:
    root = _root("bios-host", tmp_path)
    link = root / "sys/devices/pci0000:00/0000:00:03.0/0000:05:00.0/driver"
    os.symlink("/sys/bus/pci/drivers/vfio-pci", link)
    assert _by_address(root)["0000:05:00.0"]["driver"] == "vfio-pci"


def test_entries_that_are_not_addresses_are_ignored(tmp_path: Path) -> None:
    root = _root("vm-guest", tmp_path)
    (root / "sys/bus/pci/devices/not-a-device").mkdir()
    assert len(list_devices(Host(root))) == 6
