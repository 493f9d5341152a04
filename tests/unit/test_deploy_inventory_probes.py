"""inventory() runs `wipefs -n` (a process start each) only on the disks a plan could
name: eligibility does not depend on signatures, and a disk that is ineligible anyway
(zram, no serial, read-only, mounted, ...) would only be probed for a flag nobody acts
on. lsblk and wipefs are stand-ins here: their answers are fixed, their calls recorded."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from spk_visor.deploy import inventory


def _dev(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "path": f"/dev/{name}", "size": 8 << 30, "type": "disk",
            "serial": f"SER-{name}", "ro": False, "rm": False, **kw}  # fmt: skip


LSBLK = {
    "blockdevices": [
        _dev("sda"),  # eligible, no table lsblk can see: probed
        _dev("sdb", pttype="gpt"),  # lsblk sees a table already: never probed
        _dev("zram0"),  # ram: ineligible
        _dev("vda", serial=""),  # no serial: ineligible
        _dev("sdc", ro=True),  # read-only: ineligible
        _dev("sdd", children=[{"name": "sdd1", "mountpoints": ["/srv"]}]),  # mounted
    ]
}


@pytest.fixture
def probed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        if argv[0] == "lsblk":
            return subprocess.CompletedProcess(argv, 0, json.dumps(LSBLK), "")
        assert argv[0] == "wipefs", argv
        calls.append(argv[-1])
        return subprocess.CompletedProcess(argv, 0, json.dumps({"signatures": []}), "")

    monkeypatch.setattr(inventory, "_run", run)
    return calls


def test_only_disks_a_plan_could_name_are_probed(probed: list[str]) -> None:
    disks = {d.name: d for d in inventory.inventory()}
    assert probed == ["/dev/sda"]
    assert disks["sda"].eligible and disks["sdb"].eligible
    assert not any(disks[n].eligible for n in ("zram0", "vda", "sdc", "sdd"))
    assert disks["sdb"].has_signatures and not disks["sda"].has_signatures


def test_a_plans_disk_is_still_probed(probed: list[str]) -> None:
    """The PLAN's check (only_serial) probes the named disk, as before."""
    disks = inventory.inventory(only_serial="SER-sda")
    assert probed == ["/dev/sda"]
    assert [d.name for d in disks if d.eligible] == ["sda", "sdb"]
