"""smechvisord.iommu.readiness: the three checks, on every fixture and on edited ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from smechvisord.host import Host, HostError
from smechvisord.iommu import (
    CHECK_IDS,
    iommu_enabled_by,
    iommu_tokens,
    passthrough_mode,
    readiness,
)
from tests.support import sysroots
from tests.support.schemas import CHECK_KEYS, IOMMU_KEYS
from tests.support.sysroots import EXPECTED, KINDS


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _root(kind: str, tmp_path: Path) -> Path:
    return sysroots.build(kind, tmp_path / kind)


def test_readiness_matches_expected(kind: str, tmp_path: Path) -> None:
    result = readiness(Host(_root(kind, tmp_path)))
    exp = EXPECTED[kind]
    assert set(result) == IOMMU_KEYS
    assert result["ready"] is exp["iommu_ready"]
    assert result["cpu_virtualization"] == exp["cpu_virtualization"]
    assert result["iommu_groups"] == exp["iommu_groups"]
    assert result["cmdline_flags"] == exp["cmdline_flags"]
    assert result["iommu_passthrough"] is exp["iommu_passthrough"]


def test_checks_shape_and_blockers(kind: str, tmp_path: Path) -> None:
    result = readiness(Host(_root(kind, tmp_path)))
    checks = result["checks"]
    assert isinstance(checks, list)
    assert [c["id"] for c in checks] == list(CHECK_IDS)
    for check in checks:
        assert set(check) == CHECK_KEYS
        assert check["label"]
        assert check["detail"]
        # A passing check has nothing to fix; a failing one says what to do.
        assert (check["fix"] == "") is check["ok"]
    failing = [c["id"] for c in checks if not c["ok"]]
    assert failing == EXPECTED[kind]["failing_checks"]
    blockers = result["blockers"]
    assert isinstance(blockers, list)
    assert len(blockers) == len(failing)
    # Each blocker ends with its check's fix, so it is something a person can act on.
    for blocker, check in zip(blockers, [c for c in checks if not c["ok"]], strict=True):
        fix = str(check["fix"])
        assert blocker.endswith(fix[0].lower() + fix[1:])
    assert result["ready"] is (not blockers)


def test_empty_groups_blocker_is_the_documented_sentence(tmp_path: Path) -> None:
    result = readiness(Host(_root("amd-no-iommu", tmp_path)))
    assert result["blockers"] == ["IOMMU groups are empty: enable VT-d / AMD-Vi in firmware setup"]


def test_vm_guest_names_every_problem(tmp_path: Path) -> None:
    blockers = readiness(Host(_root("vm-guest", tmp_path)))["blockers"]
    assert isinstance(blockers, list)
    assert "no vmx or svm" in blockers[0]
    assert blockers[1].startswith("IOMMU groups are empty")
    # An AMD guest is told the AMD flag, not both.
    assert "add amd_iommu=on iommu=pt" in blockers[2]


def test_removing_the_cmdline_flag_fails_only_that_check(tmp_path: Path) -> None:
    root = _root("intel-ready", tmp_path)
    (root / "proc/cmdline").write_text("BOOT_IMAGE=/boot/vmlinuz-lts root=/dev/nvme0n1p2 ro\n")
    result = readiness(Host(root))
    assert result["ready"] is False
    assert [c["id"] for c in result["checks"] if not c["ok"]] == ["kernel_cmdline"]  # type: ignore[attr-defined]
    assert result["blockers"] == [
        "The kernel command line lacks intel_iommu=on or amd_iommu=on: add intel_iommu=on "
        "iommu=pt to the kernel command line in the boot loader configuration, then reboot"
    ]
    assert result["cmdline_flags"] == []
    assert result["iommu_passthrough"] is False


def test_removing_the_groups_dir_counts_zero(tmp_path: Path) -> None:
    root = _root("bios-host", tmp_path)
    for group in (root / "sys/kernel/iommu_groups").iterdir():
        for link in (group / "devices").iterdir():
            link.unlink()
        (group / "devices").rmdir()
        group.rmdir()
    (root / "sys/kernel/iommu_groups").rmdir()
    result = readiness(Host(root))
    assert result["iommu_groups"] == 0
    assert result["ready"] is False


def test_only_numbered_group_directories_count(tmp_path: Path) -> None:
    root = _root("intel-ready", tmp_path)
    (root / "sys/kernel/iommu_groups/README").write_text("not a group\n")
    (root / "sys/kernel/iommu_groups/default").mkdir()
    assert readiness(Host(root))["iommu_groups"] == EXPECTED["intel-ready"]["iommu_groups"]


def test_missing_cmdline_is_an_error_not_a_guess(tmp_path: Path) -> None:
    root = _root("intel-ready", tmp_path)
    (root / "proc/cmdline").unlink()
    with pytest.raises(HostError, match="/proc/cmdline"):
        readiness(Host(root))


@pytest.mark.parametrize(
    ("cmdline", "enabled"),
    [
        ("intel_iommu=on", ["intel_iommu=on"]),
        ("intel_iommu=on,sm_on", ["intel_iommu=on,sm_on"]),
        ("amd_iommu=on", ["amd_iommu=on"]),
        ("intel_iommu=on intel_iommu=off", []),  # the later token wins, as in the kernel
        ("intel_iommu=off amd_iommu=off", []),
        ("intel_iommu", []),
        ("iommu=pt", []),
        ("intel_iommu=onx", []),
    ],
)
def test_iommu_enabled_by(cmdline: str, enabled: list[str]) -> None:
    assert iommu_enabled_by(cmdline.split()) == enabled


@pytest.mark.parametrize(
    ("cmdline", "passthrough"),
    [
        ("iommu=pt", True),
        ("iommu.passthrough=1", True),
        ("iommu=pt iommu=nopt", False),
        ("intel_iommu=on", False),
        ("iommu=ptx", False),
    ],
)
def test_passthrough_mode(cmdline: str, passthrough: bool) -> None:
    assert passthrough_mode(cmdline.split()) is passthrough


def test_iommu_tokens_keeps_only_iommu_parameters() -> None:
    cmdline = "root=/dev/sda1 quiet intel_iommu=on iommu=pt iommu.strict=0 vfio-pci.ids=10de:2204"
    assert iommu_tokens(cmdline.split()) == ["intel_iommu=on", "iommu=pt", "iommu.strict=0"]
