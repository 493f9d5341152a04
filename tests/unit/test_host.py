"""smechvisord.host against the fixture sysroots, plus the edge cases each fact can hit."""

from __future__ import annotations

import os
import platform
import struct
import sys
from pathlib import Path, PurePosixPath

import pytest

from smechvisord.host import (
    READ_CHUNK,
    READ_LIMIT,
    CpuInfo,
    Host,
    HostError,
    parse_cpuinfo,
    parse_meminfo,
)
from tests.support import sysroots
from tests.support.schemas import HOST_KEYS
from tests.support.sysroots import EXPECTED, KINDS


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def host(kind: str, tmp_path: Path) -> Host:
    return Host(sysroots.build(kind, tmp_path / kind))


# -- every kind ---------------------------------------------------------------------------


def test_cpu(host: Host, kind: str) -> None:
    cpu = host.cpu()
    exp = EXPECTED[kind]
    assert isinstance(cpu, CpuInfo)
    assert (cpu.model, cpu.vendor, cpu.cores, cpu.threads) == (
        exp["cpu_model"],
        exp["cpu_vendor"],
        exp["cpu_cores"],
        exp["cpu_threads"],
    )
    virt = exp["cpu_virtualization"]
    assert ("vmx" in cpu.flags) == (virt == "vmx")
    assert ("svm" in cpu.flags) == (virt == "svm")
    # "vmx flags" is a separate line on Intel; its words must not leak into the flags.
    assert "preemption_timer" not in cpu.flags


def test_memory_and_small_facts(host: Host, kind: str) -> None:
    exp = EXPECTED[kind]
    assert host.memory() == (exp["memory_total_mb"], exp["memory_used_mb"])
    assert host.uptime_seconds() == exp["uptime_seconds"]
    assert host.loadavg() == exp["load_average"]
    assert host.hostname() == exp["hostname"]
    assert host.kernel() == exp["kernel"]
    assert host.kvm_available() is exp["kvm_available"]
    assert host.boot_mode() == exp["boot_mode"]
    assert host.vfio_loaded() is exp["vfio_loaded"]


def test_cmdline_is_the_token_list(host: Host, kind: str) -> None:
    assert host.cmdline() == sysroots.SPECS[kind].cmdline.split()
    assert host.cmdline()[0].startswith("BOOT_IMAGE=")


def test_node_facts_has_exactly_the_documented_keys(host: Host, kind: str) -> None:
    facts = host.node_facts()
    assert set(facts) == HOST_KEYS
    assert facts == {key: EXPECTED[kind][key] for key in HOST_KEYS}
    assert all(isinstance(v, float) for v in facts["load_average"])  # type: ignore[attr-defined]


def test_efivars_dir_and_os_indications(host: Host, kind: str) -> None:
    exp = EXPECTED[kind]
    efivars = host.efivars_dir()
    assert efivars == host.sysroot / "sys/firmware/efi/efivars"
    supported = efivars / sysroots.OS_INDICATIONS_SUPPORTED
    if exp["os_indications_supported"] is None:
        assert not supported.exists()
    else:
        attributes, value = struct.unpack("<IQ", supported.read_bytes())
        assert attributes == sysroots.ATTR_BS_RT
        assert value == exp["os_indications_supported"]
        assert bool(value & 1) is exp["boot_to_firmware_supported"]
    current = efivars / sysroots.OS_INDICATIONS
    if exp["os_indications"] is None:
        assert not current.exists()
    else:
        assert struct.unpack("<IQ", current.read_bytes()) == (
            sysroots.ATTR_NV_BS_RT,
            exp["os_indications"],
        )


def test_root_source_and_default_route(host: Host, kind: str) -> None:
    spec_root = {
        "intel-ready": "/dev/nvme0n1p2",
        "amd-no-iommu": "/dev/sda2",
        "vm-guest": "/dev/vda1",
        "bios-host": "/dev/mapper/pve-root",
    }
    assert host.root_source() == spec_root[kind]
    assert host.default_route_interfaces() == [EXPECTED[kind]["management_interface"]]


# -- caching ------------------------------------------------------------------------------


def test_cpu_is_read_once(tmp_path: Path) -> None:
    host = Host(sysroots.build("intel-ready", tmp_path))
    first = host.cpu()
    (tmp_path / "proc/cpuinfo").unlink()
    assert host.cpu() is first
    # Memory is not cached: it changes all the time.
    (tmp_path / "proc/meminfo").write_text("MemTotal: 2048 kB\nMemAvailable: 1024 kB\n")
    assert host.memory() == (2, 1)


# -- cpuinfo edge cases -------------------------------------------------------------------


def test_cpuinfo_without_topology_counts_logical_cpus() -> None:
    text = "".join(f"processor\t: {n}\nmodel name\t: Virt\nflags\t\t: fpu\n\n" for n in range(3))
    cpu = parse_cpuinfo(text)
    assert (cpu.cores, cpu.threads, cpu.model, cpu.vendor) == (3, 3, "Virt", "unknown")


def test_cpuinfo_with_partial_topology_falls_back() -> None:
    # One block without "core id": pairs would undercount, so use the logical count.
    text = (
        "processor : 0\nphysical id : 0\ncore id : 0\n\n"
        "processor : 1\nphysical id : 0\ncore id : 0\n\n"
        "processor : 2\nphysical id : 0\n\n"
    )
    assert parse_cpuinfo(text).cores == 3


def test_cpuinfo_counts_socket_core_pairs_not_core_ids() -> None:
    text = "".join(
        f"processor : {n}\nphysical id : {n // 2}\ncore id : {n % 2}\n\n" for n in range(4)
    )
    assert parse_cpuinfo(text).cores == 4


def test_cpuinfo_collapses_model_whitespace() -> None:
    cpu = parse_cpuinfo("processor : 0\nmodel name : AMD  Ryzen 9   7950X 16-Core   \n")
    assert cpu.model == "AMD Ryzen 9 7950X 16-Core"


def test_empty_cpuinfo_is_a_clear_error() -> None:
    with pytest.raises(HostError, match="no 'processor' entries"):
        parse_cpuinfo("garbage\n")


# -- meminfo edge cases -------------------------------------------------------------------


def test_meminfo_malformed_is_a_clear_error() -> None:
    with pytest.raises(HostError, match="MemTotal"):
        parse_meminfo("MemTotal: lots\nMemAvailable: 12 kB\n")


def test_meminfo_available_above_total_is_refused() -> None:
    with pytest.raises(HostError, match="exceeds MemTotal"):
        parse_meminfo("MemTotal: 1024 kB\nMemAvailable: 4096 kB\n")


def test_meminfo_without_memavailable_estimates_like_old_free() -> None:
    text = "MemTotal: 10240 kB\nMemFree: 2048 kB\nBuffers: 1024 kB\nCached: 1024 kB\n"
    assert parse_meminfo(text) == (10, 6)
    with pytest.raises(HostError, match="neither MemAvailable"):
        parse_meminfo("MemTotal: 10240 kB\nMemFree: 2048 kB\n")


def test_meminfo_floors_the_used_difference_once() -> None:
    # 1025 kB used is 1.001 MiB: reported as 1, not as 2 MiB - 0 MiB.
    assert parse_meminfo("MemTotal: 2048 kB\nMemAvailable: 1023 kB\n") == (2, 1)


# -- missing and malformed files ----------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "call"),
    [
        ("proc/cpuinfo", Host.cpu),
        ("proc/meminfo", Host.memory),
        ("proc/uptime", Host.uptime_seconds),
        ("proc/loadavg", Host.loadavg),
        ("proc/cmdline", Host.cmdline),
        ("proc/sys/kernel/hostname", Host.hostname),
        ("proc/sys/kernel/osrelease", Host.kernel),
        ("proc/mounts", Host.root_source),
        ("proc/net/route", Host.default_route_interfaces),
    ],
)
def test_missing_proc_file_raises_naming_it(tmp_path: Path, relative: str, call: object) -> None:
    host = Host(sysroots.build("intel-ready", tmp_path))
    (tmp_path / relative).unlink()
    with pytest.raises(HostError, match=f"/{relative} does not exist"):
        call(host)  # type: ignore[operator]


def test_node_facts_raises_on_a_missing_file(tmp_path: Path) -> None:
    host = Host(sysroots.build("vm-guest", tmp_path))
    (tmp_path / "proc/loadavg").unlink()
    with pytest.raises(HostError, match="loadavg"):
        host.node_facts()


@pytest.mark.parametrize("content", ["", "0.1 0.2\n", "a b c 1/2 3\n"])
def test_malformed_loadavg(tmp_path: Path, content: str) -> None:
    host = Host(sysroots.build("vm-guest", tmp_path))
    (tmp_path / "proc/loadavg").write_text(content)
    with pytest.raises(HostError, match="/proc/loadavg"):
        host.loadavg()


def test_malformed_uptime(tmp_path: Path) -> None:
    host = Host(sysroots.build("vm-guest", tmp_path))
    (tmp_path / "proc/uptime").write_text("soon\n")
    with pytest.raises(HostError, match="/proc/uptime"):
        host.uptime_seconds()


def test_reads_are_capped(tmp_path: Path) -> None:
    host = Host(sysroots.build("vm-guest", tmp_path))
    (tmp_path / "proc/cmdline").write_bytes(b"x" * (READ_LIMIT + 1))
    with pytest.raises(HostError, match="larger than"):
        host.cmdline()
    assert host.read_text("/proc/uptime", limit=16) == "125.03 480.11\n"
    with pytest.raises(HostError, match="larger than 4 bytes"):
        host.read_text("/proc/uptime", limit=4)


def test_reads_span_many_chunks(tmp_path: Path) -> None:
    host = Host(sysroots.build("vm-guest", tmp_path))
    big = "x" * (3 * READ_CHUNK + 17)
    (tmp_path / "proc/cmdline").write_text(big)
    assert host.cmdline() == [big]


@pytest.mark.skipif(sys.platform != "linux", reason="reads the real /proc")
def test_real_proc_sys_is_readable() -> None:
    # /proc/sys handlers fail with ENOMEM when asked for a few MiB in one read().
    assert Host(Path("/")).kernel() == platform.release()


def test_reading_a_directory_is_a_host_error(tmp_path: Path) -> None:
    host = Host(sysroots.build("vm-guest", tmp_path))
    (tmp_path / "proc/cpuinfo").unlink()
    (tmp_path / "proc/cpuinfo").mkdir()
    with pytest.raises(HostError, match="cannot read /proc/cpuinfo"):
        host.cpu()


def test_presence_checks_on_an_empty_sysroot(tmp_path: Path) -> None:
    host = Host(tmp_path)
    assert host.kvm_available() is False
    assert host.boot_mode() == "bios"
    assert host.vfio_loaded() is False
    assert host.iommu_groups() == {}
    assert host.listdir("/sys/bus/pci/devices") == []


# -- symlinks stay inside the sysroot -----------------------------------------------------


@pytest.fixture
def jail(tmp_path: Path) -> Path:
    """A sysroot beside a 'secret' file that no link may reach."""
    (tmp_path / "secret").write_text("outside\n")
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "secret").write_text("inside\n")
    return root


def test_relative_escape_is_contained(jail: Path) -> None:
    os.symlink("../../../../../../secret", jail / "proc/cmdline")
    host = Host(jail)
    assert host.resolve("/proc/cmdline") == PurePosixPath("/secret")
    assert host.path("/proc/cmdline") == jail / "secret"
    assert host.read_text("/proc/cmdline") == "inside\n"


def test_absolute_target_is_rerooted(jail: Path) -> None:
    os.symlink(str(jail.parent / "secret"), jail / "proc/a")  # the real absolute path
    os.symlink("/secret", jail / "proc/b")
    host = Host(jail)
    # /<tmp>/secret re-rooted is <jail>/<tmp>/secret, which does not exist: not the secret.
    assert host.path("/proc/a") == jail.joinpath(*(jail.parent / "secret").parts[1:])
    with pytest.raises(HostError, match="does not exist"):
        host.read_text("/proc/a")
    assert host.read_text("/proc/b") == "inside\n"


def test_dotdot_in_the_query_is_contained(jail: Path) -> None:
    host = Host(jail)
    assert host.resolve("/../../secret") == PurePosixPath("/secret")
    assert host.read_text("/proc/../../../secret") == "inside\n"


def test_symlink_loop_is_an_error(jail: Path) -> None:
    os.symlink("b", jail / "proc/a")
    os.symlink("a", jail / "proc/b")
    with pytest.raises(HostError, match="too many levels"):
        Host(jail).resolve("/proc/a")


def test_dotdot_after_a_link_is_physical(jail: Path) -> None:
    # sysfs relies on this: /sys/class/net/eth0/device is relative to the device directory.
    (jail / "deep/dir").mkdir(parents=True)
    (jail / "deep/target").write_text("physical\n")
    os.symlink("../deep/dir", jail / "proc/link")
    assert Host(jail).read_text("/proc/link/../target") == "physical\n"


def test_link_name(jail: Path) -> None:
    os.symlink("../sys/bus/pci/drivers/nvme", jail / "proc/driver")
    os.symlink("/../../../etc", jail / "proc/up")
    (jail / "proc/plain").write_text("")
    host = Host(jail)
    assert host.link_name("/proc/driver") == "nvme"
    assert host.link_name("/proc/up") == "etc"
    assert host.link_name("/proc/plain") is None
    assert host.link_name("/proc/missing") is None
