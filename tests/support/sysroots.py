"""Fixture sysroots: small /proc, /sys and /dev trees shaped like four real hosts.

``build(kind, dest)`` writes one tree; ``EXPECTED[kind]`` holds what the daemon should
report for it, written out by hand (not computed from the tree) so a parsing mistake
shows up as a test failure. Symlinks are relative and stay inside the tree, as sysfs's do.

- intel-ready: Xeon, 8 cores / 16 threads, IOMMU on with iommu=pt, UEFI that can boot to
  firmware setup (an existing OsIndications with another bit set), /dev/kvm. The GPU and its
  HDMI audio share a group with their root port; the root disk is NVMe; the default route
  leaves through one port of a two-port NIC, whose other port shares its group.
- amd-no-iommu: the documented /api/node example (Threadripper PRO 9965WX, 24 cores,
  262144 MiB, 4096 used, uptime 3600, KVM). The boot loader asks for the IOMMU but the
  firmware has it off: no groups, so exactly one check fails. UEFI without boot-to-setup.
- vm-guest: a QEMU guest: no vmx/svm, no topology lines in cpuinfo (cores fall back to
  threads), no /dev/kvm, no groups, no IOMMU flags: all three checks fail. UEFI (OVMF)
  with no OsIndicationsSupported variable.
- bios-host: two-socket Xeon, IOMMU ready without iommu=pt, no /sys/firmware/efi. Root on
  LVM (dm-0 over sda3) and the address on a Linux bridge (vmbr0 over eno1): the daemon must
  follow both down to the hardware.
"""

from __future__ import annotations

import os
import posixpath
import struct
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("intel-ready", "amd-no-iommu", "vm-guest", "bios-host")

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
OS_INDICATIONS_SUPPORTED = f"OsIndicationsSupported-{EFI_GLOBAL}"
OS_INDICATIONS = f"OsIndications-{EFI_GLOBAL}"
# efivarfs files: 4 attribute bytes, then the value. 0x06 = BOOTSERVICE|RUNTIME (read-only
# variable); 0x07 adds NON_VOLATILE.
ATTR_BS_RT = 0x06
ATTR_NV_BS_RT = 0x07


# -- the shape of a host ------------------------------------------------------------------


@dataclass(frozen=True)
class Cpu:
    vendor: str
    family: int
    model: int
    model_name: str
    stepping: int
    mhz: str
    cache: str
    sockets: int
    cores_per_socket: int
    threads_per_core: int
    flags: str
    topology: bool = True  # physical id / core id / siblings / cpu cores lines
    vmx_flags: str = ""  # Intel kernels since 5.9 print a separate "vmx flags" line


@dataclass(frozen=True)
class Pci:
    address: str
    under: str  # parent directory below /sys/devices, e.g. "pci0000:00/0000:00:1d.0"
    vendor: str
    device: str
    class_id: str
    driver: str | None
    group: int | None

    @property
    def sysfs(self) -> str:
        return f"/sys/devices/{self.under}/{self.address}"


@dataclass(frozen=True)
class Block:
    name: str
    sysfs: str
    slaves: tuple[str, ...] = ()  # names of other Block entries (dm / md members)


@dataclass(frozen=True)
class Net:
    name: str
    sysfs: str
    device: str | None  # what the `device` link points at; None for virtual interfaces
    lowers: tuple[str, ...] = ()  # names of other Net entries (bridge ports, bond slaves)


@dataclass(frozen=True)
class Spec:
    hostname: str
    kernel: str
    cmdline: str
    cpu: Cpu
    mem_total_kb: int
    mem_available_kb: int
    uptime: str
    loadavg: str
    mounts: tuple[str, ...]
    routes: tuple[str, ...]  # /proc/net/route rows: iface dest gateway flags metric mask
    pci: tuple[Pci, ...]
    blocks: tuple[Block, ...]
    nets: tuple[Net, ...]
    kvm: bool
    efivars: dict[str, bytes] | None  # None: a BIOS boot, no /sys/firmware/efi at all
    modules: tuple[str, ...]
    dev_links: dict[str, str] = field(default_factory=dict)


def efivar(attributes: int, value: int) -> bytes:
    return struct.pack("<IQ", attributes, value)


# -- the four hosts -----------------------------------------------------------------------

_INTEL_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon "
    "pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor "
    "ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe "
    "popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault "
    "epb cat_l3 invpcid_single ssbd mba ibrs ibpb stibp ibrs_enhanced tpr_shadow flexpriority "
    "ept vpid ept_ad fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdt_a avx512f "
    "avx512dq rdseed adx smap avx512ifma clflushopt clwb intel_pt avx512cd sha_ni avx512bw "
    "avx512vl xsaveopt xsavec xgetbv1 xsaves md_clear pconfig flush_l1d arch_capabilities"
)
_VMX_FLAGS = (
    "vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad ept_1gb flexpriority "
    "apicv tsc_offset vtpr mtf vapic ept vpid unrestricted_guest vapic_reg vid ple"
)
_AMD_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good amd_lbr_v2 "
    "nopl nonstop_tsc cpuid extd_apicid aperfmperf rapl pni pclmulqdq monitor ssse3 fma cx16 "
    "pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm "
    "extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext "
    "perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 hw_pstate ssbd mba "
    "perfmon_v2 ibrs ibpb stibp ibrs_enhanced vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid "
    "cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni "
    "avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total "
    "cqm_mbm_local avx_vnni avx512_bf16 clzero irperf xsaveerptr rdpru wbnoinvd amd_ppin cppc "
    "arat npt lbrv svm_lock nrip_save tsc_scale vmcb_clean flushbyasid decodeassists "
    "pausefilter pfthreshold avic v_vmsave_vmload vgif x2avic v_spec_ctrl vnmi avx512vbmi umip "
    "pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq "
    "rdpid bus_lock_detect movdiri movdir64b overflow_recov succor smca fsrm avx512_vp2intersect "
    "flush_l1d"
)
_QEMU_FLAGS = (
    "fpu de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
    "sse2 syscall nx lm rep_good nopl xtopology cpuid tsc_known_freq pni cx16 x2apic "
    "hypervisor lahf_lm cmp_legacy 3dnowprefetch vmmcall"
)

_ROUTE_HEADER = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"
)
_SYSFS_MOUNTS = (
    "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0",
    "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0",
    "devtmpfs /dev devtmpfs rw,nosuid,size=10240k,nr_inodes=8211014,mode=755 0 0",
    "tmpfs /run tmpfs rw,nosuid,nodev,size=6583696k,nr_inodes=819200,mode=755 0 0",
)

_INTEL_READY = Spec(
    hostname="smech-01",
    kernel="6.6.58-0-lts",
    cmdline=(
        "BOOT_IMAGE=/boot/vmlinuz-lts root=/dev/nvme0n1p2 ro modules=sd-mod,usb-storage,ext4 "
        "quiet intel_iommu=on iommu=pt"
    ),
    cpu=Cpu(
        vendor="GenuineIntel",
        family=6,
        model=106,
        model_name="Intel(R) Xeon(R) Silver 4309Y CPU @ 2.80GHz",
        stepping=6,
        mhz="2800.000",
        cache="12288 KB",
        sockets=1,
        cores_per_socket=8,
        threads_per_core=2,
        flags=_INTEL_FLAGS,
        vmx_flags=_VMX_FLAGS,
    ),
    mem_total_kb=131859104,
    mem_available_kb=119435264,
    uptime="93784.61 1490291.20",
    loadavg="0.52 0.61 0.74 2/1054 48213",
    mounts=(
        # Older kernels list the initial rootfs first; the later "/" line is the real one.
        "rootfs / rootfs rw 0 0",
        "/dev/nvme0n1p2 / ext4 rw,relatime 0 0",
        *_SYSFS_MOUNTS,
        "/dev/nvme0n1p1 /boot/efi vfat rw,relatime,fmask=0022,dmask=0022 0 0",
        "efivarfs /sys/firmware/efi/efivars efivarfs rw,nosuid,nodev,noexec,relatime 0 0",
    ),
    routes=(
        "eno1\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0",
        "eno1\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",
        "docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0",
    ),
    pci=(
        Pci("0000:00:01.0", "pci0000:00", "8086", "347a", "060400", "pcieport", 1),
        Pci("0000:01:00.0", "pci0000:00/0000:00:01.0", "10de", "2204", "030000", "nouveau", 1),
        Pci(
            "0000:01:00.1", "pci0000:00/0000:00:01.0", "10de", "1aef", "040300", "snd_hda_intel", 1
        ),
        Pci("0000:00:14.0", "pci0000:00", "8086", "a1af", "0c0330", "xhci_hcd", 2),
        Pci("0000:00:17.0", "pci0000:00", "8086", "a182", "010601", "ahci", 3),
        Pci("0000:00:1c.0", "pci0000:00", "8086", "a190", "060400", "pcieport", 4),
        Pci("0000:04:00.0", "pci0000:00/0000:00:1c.0", "8086", "1521", "020000", "igb", 4),
        Pci("0000:04:00.1", "pci0000:00/0000:00:1c.0", "8086", "1521", "020000", "igb", 4),
        Pci("0000:00:1d.0", "pci0000:00", "8086", "a198", "060400", "pcieport", 5),
        Pci("0000:3b:00.0", "pci0000:00/0000:00:1d.0", "144d", "a80a", "010802", "nvme", 6),
    ),
    blocks=(
        Block("nvme0n1", "/sys/devices/pci0000:00/0000:00:1d.0/0000:3b:00.0/nvme/nvme0/nvme0n1"),
        Block(
            "nvme0n1p1",
            "/sys/devices/pci0000:00/0000:00:1d.0/0000:3b:00.0/nvme/nvme0/nvme0n1/nvme0n1p1",
        ),
        Block(
            "nvme0n1p2",
            "/sys/devices/pci0000:00/0000:00:1d.0/0000:3b:00.0/nvme/nvme0/nvme0n1/nvme0n1p2",
        ),
        Block("loop0", "/sys/devices/virtual/block/loop0"),
    ),
    nets=(
        Net(
            "eno1",
            "/sys/devices/pci0000:00/0000:00:1c.0/0000:04:00.0/net/eno1",
            "/sys/devices/pci0000:00/0000:00:1c.0/0000:04:00.0",
        ),
        Net(
            "eno2",
            "/sys/devices/pci0000:00/0000:00:1c.0/0000:04:00.1/net/eno2",
            "/sys/devices/pci0000:00/0000:00:1c.0/0000:04:00.1",
        ),
        Net("docker0", "/sys/devices/virtual/net/docker0", None),
        Net("lo", "/sys/devices/virtual/net/lo", None),
    ),
    kvm=True,
    efivars={
        OS_INDICATIONS_SUPPORTED: efivar(ATTR_BS_RT, 0x45),
        OS_INDICATIONS: efivar(ATTR_NV_BS_RT, 0x4),
    },
    modules=("kvm", "kvm_intel", "vfio", "vfio_iommu_type1", "nvme", "igb"),
)

_AMD_NO_IOMMU = Spec(
    hostname="smech-tr",
    kernel="6.6.58-0-lts",
    cmdline=(
        "BOOT_IMAGE=/boot/vmlinuz-lts root=UUID=3f0e6f6c-1c2b-4a8e-9d51-6b0f0d2a7c11 ro quiet "
        "intel_iommu=on amd_iommu=on iommu=pt"
    ),
    cpu=Cpu(
        vendor="AuthenticAMD",
        family=26,
        model=8,
        model_name="AMD Threadripper PRO 9965WX",
        stepping=0,
        mhz="4200.000",
        cache="1024 KB",
        sockets=1,
        cores_per_socket=24,
        threads_per_core=2,
        flags=_AMD_FLAGS,
    ),
    mem_total_kb=268435456,
    mem_available_kb=264241152,
    uptime="3600.87 172810.02",
    loadavg="1.07 0.93 0.88 3/1731 20577",
    mounts=(
        "/dev/sda2 / ext4 rw,relatime 0 0",
        *_SYSFS_MOUNTS,
        "/dev/sda1 /boot/efi vfat rw,relatime 0 0",
    ),
    routes=(
        "enp70s0f0\t00000000\t010010AC\t0003\t0\t0\t100\t00000000\t0\t0\t0",
        "enp70s0f0\t000010AC\t00000000\t0001\t0\t0\t100\t0000FFFF\t0\t0\t0",
    ),
    pci=(
        Pci("0000:40:01.1", "pci0000:40", "1022", "14ab", "060400", "pcieport", None),
        Pci("0000:41:00.0", "pci0000:40/0000:40:01.1", "1002", "744c", "030000", "amdgpu", None),
        Pci(
            "0000:41:00.1",
            "pci0000:40/0000:40:01.1",
            "1002",
            "ab30",
            "040300",
            "snd_hda_intel",
            None,
        ),
        Pci("0000:40:03.1", "pci0000:40", "1022", "14ab", "060400", "pcieport", None),
        Pci("0000:46:00.0", "pci0000:40/0000:40:03.1", "8086", "1572", "020000", "i40e", None),
        Pci("0000:c0:08.1", "pci0000:c0", "1022", "14eb", "060400", "pcieport", None),
        Pci("0000:c4:00.0", "pci0000:c0/0000:c0:08.1", "1022", "7901", "010601", "ahci", None),
    ),
    blocks=(
        Block(
            "sda",
            "/sys/devices/pci0000:c0/0000:c0:08.1/0000:c4:00.0/ata1/host0/"
            "target0:0:0/0:0:0:0/block/sda",
        ),
        Block(
            "sda2",
            "/sys/devices/pci0000:c0/0000:c0:08.1/0000:c4:00.0/ata1/host0/"
            "target0:0:0/0:0:0:0/block/sda/sda2",
        ),
    ),
    nets=(
        Net(
            "enp70s0f0",
            "/sys/devices/pci0000:40/0000:40:03.1/0000:46:00.0/net/enp70s0f0",
            "/sys/devices/pci0000:40/0000:40:03.1/0000:46:00.0",
        ),
    ),
    kvm=True,
    efivars={OS_INDICATIONS_SUPPORTED: efivar(ATTR_BS_RT, 0x4)},
    modules=("kvm", "kvm_amd", "ahci", "i40e"),
)

_VM_GUEST = Spec(
    hostname="smech-vm",
    kernel="6.6.58-0-virt",
    cmdline="BOOT_IMAGE=/boot/vmlinuz-virt root=/dev/vda1 ro console=ttyS0,115200 quiet",
    cpu=Cpu(
        vendor="AuthenticAMD",
        family=15,
        model=107,
        model_name="QEMU Virtual CPU version 2.5+",
        stepping=1,
        mhz="2399.998",
        cache="512 KB",
        sockets=1,
        cores_per_socket=4,
        threads_per_core=1,
        flags=_QEMU_FLAGS,
        topology=False,
    ),
    mem_total_kb=4025084,
    mem_available_kb=3512340,
    uptime="125.03 480.11",
    loadavg="0.08 0.02 0.01 1/97 1203",
    mounts=("/dev/vda1 / ext4 rw,relatime 0 0", *_SYSFS_MOUNTS),
    routes=(
        "eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0",
        "eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",
    ),
    pci=(
        Pci("0000:00:00.0", "pci0000:00", "8086", "1237", "060000", None, None),
        Pci("0000:00:01.0", "pci0000:00", "8086", "7000", "060100", None, None),
        Pci("0000:00:01.1", "pci0000:00", "8086", "7010", "010180", "ata_piix", None),
        Pci("0000:00:02.0", "pci0000:00", "1234", "1111", "030000", "bochs-drm", None),
        Pci("0000:00:03.0", "pci0000:00", "1af4", "1000", "020000", "virtio-pci", None),
        Pci("0000:00:04.0", "pci0000:00", "1af4", "1001", "010000", "virtio-pci", None),
    ),
    blocks=(
        Block("vda", "/sys/devices/pci0000:00/0000:00:04.0/virtio1/block/vda"),
        Block("vda1", "/sys/devices/pci0000:00/0000:00:04.0/virtio1/block/vda/vda1"),
    ),
    nets=(
        Net(
            "eth0",
            "/sys/devices/pci0000:00/0000:00:03.0/virtio0/net/eth0",
            "/sys/devices/pci0000:00/0000:00:03.0/virtio0",
        ),
    ),
    kvm=False,
    efivars={},
    modules=("virtio_net", "virtio_blk"),
)

_BIOS_HOST = Spec(
    hostname="smech-legacy",
    kernel="6.8.12-4-pve",
    cmdline=(
        "BOOT_IMAGE=/boot/vmlinuz-6.8.12-4-pve root=/dev/mapper/pve-root ro quiet intel_iommu=on"
    ),
    cpu=Cpu(
        vendor="GenuineIntel",
        family=6,
        model=79,
        model_name="Intel(R) Xeon(R) CPU E5-2603 v4 @ 1.70GHz",
        stepping=1,
        mhz="1700.000",
        cache="15360 KB",
        sockets=2,
        cores_per_socket=6,
        threads_per_core=1,
        flags=_INTEL_FLAGS,
        vmx_flags=_VMX_FLAGS,
    ),
    mem_total_kb=65768180,
    mem_available_kb=49920112,
    uptime="1209600.00 14515200.00",
    loadavg="2.15 1.98 1.87 4/902 77120",
    mounts=(
        "/dev/mapper/pve-root / ext4 rw,relatime,errors=remount-ro 0 0",
        *_SYSFS_MOUNTS,
        "/dev/sda2 /boot ext4 rw,relatime 0 0",
    ),
    routes=(
        "vmbr0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0",
        "vmbr0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",
    ),
    pci=(
        Pci("0000:00:03.0", "pci0000:00", "8086", "6f08", "060400", "pcieport", 13),
        Pci("0000:05:00.0", "pci0000:00/0000:00:03.0", "8086", "10fb", "020000", None, 13),
        Pci("0000:00:1a.0", "pci0000:00", "8086", "8d2d", "0c0320", "ehci-pci", 12),
        Pci("0000:00:1c.0", "pci0000:00", "8086", "8d10", "060400", "pcieport", 11),
        Pci("0000:02:00.0", "pci0000:00/0000:00:1c.0", "8086", "1533", "020000", "igb", 11),
        Pci("0000:00:1f.2", "pci0000:00", "8086", "8d02", "010601", "ahci", 10),
    ),
    blocks=(
        Block(
            "sda", "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda"
        ),
        Block(
            "sda2",
            "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda2",
        ),
        Block(
            "sda3",
            "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda3",
        ),
        Block("dm-0", "/sys/devices/virtual/block/dm-0", slaves=("sda3",)),
    ),
    nets=(
        Net(
            "eno1",
            "/sys/devices/pci0000:00/0000:00:1c.0/0000:02:00.0/net/eno1",
            "/sys/devices/pci0000:00/0000:00:1c.0/0000:02:00.0",
        ),
        Net("tap100i0", "/sys/devices/virtual/net/tap100i0", None),
        Net("vmbr0", "/sys/devices/virtual/net/vmbr0", None, lowers=("eno1", "tap100i0")),
    ),
    kvm=True,
    efivars=None,
    modules=("kvm", "kvm_intel", "vfio", "vfio_iommu_type1", "vfio_pci", "dm_mod"),
    dev_links={"/dev/mapper/pve-root": "/dev/dm-0"},
)

SPECS: dict[str, Spec] = {
    "intel-ready": _INTEL_READY,
    "amd-no-iommu": _AMD_NO_IOMMU,
    "vm-guest": _VM_GUEST,
    "bios-host": _BIOS_HOST,
}


# -- what the daemon should report: written by hand ---------------------------------------


# One row per device: address, vendor, device, class, class name, driver, IOMMU group,
# host-critical ("root" or "net:<iface>"), viable. group_devices is every address of the
# same table with the same group.
_ROOT = "carries the root filesystem"
_Row = tuple[str, str, str, str, str, str | None, int | None, str | None, bool]


def _critical(code: str | None) -> str | None:
    if code == "root":
        return _ROOT
    return f"carries the management network {code.removeprefix('net:')}" if code else None


def _devices(*rows: _Row) -> dict[str, dict[str, object]]:
    table: dict[str, dict[str, object]] = {}
    for address, vendor, device, class_id, name, driver, group, critical, viable in rows:
        members = sorted(r[0] for r in rows if group is not None and r[6] == group)
        table[address] = {
            "vendor_id": vendor, "device_id": device, "class_id": class_id, "class_name": name,
            "driver": driver, "iommu_group": group, "group_devices": members,
            "host_critical": _critical(critical), "viable": viable,
        }  # fmt: skip
    return table


_BRIDGE = "PCI bridge"
_VGA = "VGA compatible controller"
_ETH = "Ethernet controller"
_SATA = "SATA controller"

# fmt: off
_INTEL_READY_PCI = _devices(
    ("0000:00:01.0", "8086", "347a", "060400", _BRIDGE, "pcieport", 1, None, False),
    ("0000:00:14.0", "8086", "a1af", "0c0330", "USB controller", "xhci_hcd", 2, None, True),
    ("0000:00:17.0", "8086", "a182", "010601", _SATA, "ahci", 3, None, True),
    ("0000:00:1c.0", "8086", "a190", "060400", _BRIDGE, "pcieport", 4, None, False),
    ("0000:00:1d.0", "8086", "a198", "060400", _BRIDGE, "pcieport", 5, None, False),
    ("0000:01:00.0", "10de", "2204", "030000", _VGA, "nouveau", 1, None, True),
    ("0000:01:00.1", "10de", "1aef", "040300", "Audio device", "snd_hda_intel", 1, None, True),
    ("0000:04:00.0", "8086", "1521", "020000", _ETH, "igb", 4, "net:eno1", False),
    ("0000:04:00.1", "8086", "1521", "020000", _ETH, "igb", 4, None, False),
    ("0000:3b:00.0", "144d", "a80a", "010802", "Non-Volatile memory controller", "nvme", 6,
     "root", False),
)
_AMD_NO_IOMMU_PCI = _devices(
    ("0000:40:01.1", "1022", "14ab", "060400", _BRIDGE, "pcieport", None, None, False),
    ("0000:40:03.1", "1022", "14ab", "060400", _BRIDGE, "pcieport", None, None, False),
    ("0000:41:00.0", "1002", "744c", "030000", _VGA, "amdgpu", None, None, False),
    ("0000:41:00.1", "1002", "ab30", "040300", "Audio device", "snd_hda_intel", None, None,
     False),
    ("0000:46:00.0", "8086", "1572", "020000", _ETH, "i40e", None, "net:enp70s0f0", False),
    ("0000:c0:08.1", "1022", "14eb", "060400", _BRIDGE, "pcieport", None, None, False),
    ("0000:c4:00.0", "1022", "7901", "010601", _SATA, "ahci", None, "root", False),
)
_VM_GUEST_PCI = _devices(
    ("0000:00:00.0", "8086", "1237", "060000", "Host bridge", None, None, None, False),
    ("0000:00:01.0", "8086", "7000", "060100", "ISA bridge", None, None, None, False),
    ("0000:00:01.1", "8086", "7010", "010180", "IDE interface", "ata_piix", None, None, False),
    ("0000:00:02.0", "1234", "1111", "030000", _VGA, "bochs-drm", None, None, False),
    ("0000:00:03.0", "1af4", "1000", "020000", _ETH, "virtio-pci", None, "net:eth0", False),
    ("0000:00:04.0", "1af4", "1001", "010000", "SCSI storage controller", "virtio-pci", None,
     "root", False),
)
_BIOS_HOST_PCI = _devices(
    ("0000:00:03.0", "8086", "6f08", "060400", _BRIDGE, "pcieport", 13, None, False),
    ("0000:00:1a.0", "8086", "8d2d", "0c0320", "USB controller", "ehci-pci", 12, None, True),
    ("0000:00:1c.0", "8086", "8d10", "060400", _BRIDGE, "pcieport", 11, None, False),
    ("0000:00:1f.2", "8086", "8d02", "010601", _SATA, "ahci", 10, "root", False),
    ("0000:02:00.0", "8086", "1533", "020000", _ETH, "igb", 11, "net:vmbr0", False),
    ("0000:05:00.0", "8086", "10fb", "020000", _ETH, None, 13, None, True),
)
# fmt: on

EXPECTED: dict[str, dict[str, object]] = {
    "intel-ready": {
        "cpu_model": "Intel(R) Xeon(R) Silver 4309Y CPU @ 2.80GHz",
        "cpu_vendor": "GenuineIntel",
        "cpu_cores": 8,
        "cpu_threads": 16,
        "cpu_virtualization": "vmx",
        "memory_total_mb": 128768,
        "memory_used_mb": 12132,
        "uptime_seconds": 93784,
        "load_average": [0.52, 0.61, 0.74],
        "hostname": "smech-01",
        "kernel": "6.6.58-0-lts",
        "kvm_available": True,
        "boot_mode": "uefi",
        "vfio_loaded": False,
        "os_indications_supported": 0x45,
        "os_indications": 0x4,
        "boot_to_firmware_supported": True,
        "iommu_ready": True,
        "failing_checks": [],
        "iommu_groups": 6,
        "cmdline_flags": ["intel_iommu=on", "iommu=pt"],
        "iommu_passthrough": True,
        "root_device": "nvme0n1p2",
        "management_interface": "eno1",
        "host_critical": {
            "0000:04:00.0": "carries the management network eno1",
            "0000:3b:00.0": _ROOT,
        },
        "pci": _INTEL_READY_PCI,
    },
    "amd-no-iommu": {
        "cpu_model": "AMD Threadripper PRO 9965WX",
        "cpu_vendor": "AuthenticAMD",
        "cpu_cores": 24,
        "cpu_threads": 48,
        "cpu_virtualization": "svm",
        "memory_total_mb": 262144,
        "memory_used_mb": 4096,
        "uptime_seconds": 3600,
        "load_average": [1.07, 0.93, 0.88],
        "hostname": "smech-tr",
        "kernel": "6.6.58-0-lts",
        "kvm_available": True,
        "boot_mode": "uefi",
        "vfio_loaded": False,
        "os_indications_supported": 0x4,
        "os_indications": None,
        "boot_to_firmware_supported": False,
        "iommu_ready": False,
        "failing_checks": ["iommu_groups"],
        "iommu_groups": 0,
        "cmdline_flags": ["intel_iommu=on", "amd_iommu=on", "iommu=pt"],
        "iommu_passthrough": True,
        "root_device": "sda2",
        "management_interface": "enp70s0f0",
        "host_critical": {
            "0000:46:00.0": "carries the management network enp70s0f0",
            "0000:c4:00.0": _ROOT,
        },
        "pci": _AMD_NO_IOMMU_PCI,
    },
    "vm-guest": {
        "cpu_model": "QEMU Virtual CPU version 2.5+",
        "cpu_vendor": "AuthenticAMD",
        "cpu_cores": 4,
        "cpu_threads": 4,
        "cpu_virtualization": None,
        "memory_total_mb": 3930,
        "memory_used_mb": 500,
        "uptime_seconds": 125,
        "load_average": [0.08, 0.02, 0.01],
        "hostname": "smech-vm",
        "kernel": "6.6.58-0-virt",
        "kvm_available": False,
        "boot_mode": "uefi",
        "vfio_loaded": False,
        "os_indications_supported": None,
        "os_indications": None,
        "boot_to_firmware_supported": False,
        "iommu_ready": False,
        "failing_checks": ["cpu_virtualization", "iommu_groups", "kernel_cmdline"],
        "iommu_groups": 0,
        "cmdline_flags": [],
        "iommu_passthrough": False,
        "root_device": "vda1",
        "management_interface": "eth0",
        "host_critical": {
            "0000:00:03.0": "carries the management network eth0",
            "0000:00:04.0": _ROOT,
        },
        "pci": _VM_GUEST_PCI,
    },
    "bios-host": {
        "cpu_model": "Intel(R) Xeon(R) CPU E5-2603 v4 @ 1.70GHz",
        "cpu_vendor": "GenuineIntel",
        # Two sockets with core ids 0-5 each: 12 (socket, core) pairs, not 6 core ids.
        "cpu_cores": 12,
        "cpu_threads": 12,
        "cpu_virtualization": "vmx",
        "memory_total_mb": 64226,
        "memory_used_mb": 15476,
        "uptime_seconds": 1209600,
        "load_average": [2.15, 1.98, 1.87],
        "hostname": "smech-legacy",
        "kernel": "6.8.12-4-pve",
        "kvm_available": True,
        "boot_mode": "bios",
        "vfio_loaded": True,
        "os_indications_supported": None,
        "os_indications": None,
        "boot_to_firmware_supported": False,
        "iommu_ready": True,
        "failing_checks": [],
        "iommu_groups": 4,
        "cmdline_flags": ["intel_iommu=on"],
        "iommu_passthrough": False,
        "root_device": "dm-0",
        "management_interface": "vmbr0",
        "host_critical": {
            "0000:00:1f.2": _ROOT,
            "0000:02:00.0": "carries the management network vmbr0",
        },
        "pci": _BIOS_HOST_PCI,
    },
}


# -- writing a tree -----------------------------------------------------------------------


def _at(root: Path, host_path: str) -> Path:
    return root / host_path.lstrip("/")


def _write(root: Path, host_path: str, data: str | bytes) -> None:
    path = _at(root, host_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)


def _mkdir(root: Path, host_path: str) -> None:
    _at(root, host_path).mkdir(parents=True, exist_ok=True)


def _link(root: Path, link: str, target: str) -> None:
    """A relative symlink from host path ``link`` to host path ``target``, as sysfs has."""
    path = _at(root, link)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(posixpath.relpath(target, posixpath.dirname(link)), path)


def cpuinfo(cpu: Cpu) -> str:
    """/proc/cpuinfo as x86 Linux prints it: sibling threads numbered after all cores."""
    blocks = []
    number = 0
    for thread in range(cpu.threads_per_core):
        for socket in range(cpu.sockets):
            for core in range(cpu.cores_per_socket):
                apic = (socket << 6) | (core << 1) | thread
                lines = [
                    f"processor\t: {number}",
                    f"vendor_id\t: {cpu.vendor}",
                    f"cpu family\t: {cpu.family}",
                    f"model\t\t: {cpu.model}",
                    f"model name\t: {cpu.model_name}",
                    f"stepping\t: {cpu.stepping}",
                    "microcode\t: 0xd0003a5",
                    f"cpu MHz\t\t: {cpu.mhz}",
                    f"cache size\t: {cpu.cache}",
                ]
                if cpu.topology:
                    lines += [
                        f"physical id\t: {socket}",
                        f"siblings\t: {cpu.cores_per_socket * cpu.threads_per_core}",
                        f"core id\t\t: {core}",
                        f"cpu cores\t: {cpu.cores_per_socket}",
                        f"apicid\t\t: {apic}",
                        f"initial apicid\t: {apic}",
                    ]
                lines += [
                    "fpu\t\t: yes",
                    "fpu_exception\t: yes",
                    "cpuid level\t: 27",
                    "wp\t\t: yes",
                    f"flags\t\t: {cpu.flags}",
                ]
                if cpu.vmx_flags:
                    lines.append(f"vmx flags\t: {cpu.vmx_flags}")
                lines += [
                    "bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass swapgs",
                    "bogomips\t: 5600.00",
                    "clflush size\t: 64",
                    "cache_alignment\t: 64",
                    "address sizes\t: 46 bits physical, 57 bits virtual",
                    "power management:",
                ]
                blocks.append("\n".join(lines) + "\n")
                number += 1
    return "\n".join(blocks) + "\n"


def meminfo(total_kb: int, available_kb: int) -> str:
    free = available_kb // 2
    lines = [
        ("MemTotal", total_kb),
        ("MemFree", free),
        ("MemAvailable", available_kb),
        ("Buffers", 204800),
        ("Cached", available_kb - free - 204800),
        ("SwapCached", 0),
        ("Active", total_kb // 10),
        ("Inactive", total_kb // 12),
        ("Active(anon)", total_kb // 20),
        ("Inactive(anon)", 0),
        ("SwapTotal", 8388604),
        ("SwapFree", 8388604),
        ("Shmem", 65536),
        ("Slab", 524288),
        ("VmallocTotal", 34359738367),
        ("HardwareCorrupted", 0),
    ]
    text = "".join(f"{key + ':':<16}{value:>8} kB\n" for key, value in lines)
    # Counts without a unit come at the end, as the kernel prints them.
    return (
        text + "HugePages_Total:       0\nHugePages_Free:        0\nHugepagesize:       2048 kB\n"
    )


def _write_proc(root: Path, spec: Spec) -> None:
    _write(root, "/proc/cpuinfo", cpuinfo(spec.cpu))
    _write(root, "/proc/meminfo", meminfo(spec.mem_total_kb, spec.mem_available_kb))
    _write(root, "/proc/uptime", spec.uptime + "\n")
    _write(root, "/proc/loadavg", spec.loadavg + "\n")
    _write(root, "/proc/cmdline", spec.cmdline + "\n")
    _write(root, "/proc/mounts", "\n".join(spec.mounts) + "\n")
    _write(root, "/proc/net/route", "\n".join((_ROUTE_HEADER, *spec.routes)) + "\n")
    _write(root, "/proc/sys/kernel/hostname", spec.hostname + "\n")
    _write(root, "/proc/sys/kernel/osrelease", spec.kernel + "\n")


def _write_pci(root: Path, devices: tuple[Pci, ...]) -> None:
    _mkdir(root, "/sys/kernel/iommu_groups")  # present even when the IOMMU is off
    for dev in devices:
        _write(root, f"{dev.sysfs}/vendor", f"0x{dev.vendor}\n")
        _write(root, f"{dev.sysfs}/device", f"0x{dev.device}\n")
        _write(root, f"{dev.sysfs}/class", f"0x{dev.class_id}\n")
        _link(root, f"/sys/bus/pci/devices/{dev.address}", dev.sysfs)
        if dev.driver:
            _mkdir(root, f"/sys/bus/pci/drivers/{dev.driver}")
            _link(root, f"{dev.sysfs}/driver", f"/sys/bus/pci/drivers/{dev.driver}")
        if dev.group is not None:
            group = f"/sys/kernel/iommu_groups/{dev.group}"
            _link(root, f"{group}/devices/{dev.address}", dev.sysfs)
            _link(root, f"{dev.sysfs}/iommu_group", group)


def _write_blocks_and_nets(root: Path, spec: Spec) -> None:
    blocks = {b.name: b for b in spec.blocks}
    for block in spec.blocks:
        _write(root, f"{block.sysfs}/dev", "259:0\n")
        _link(root, f"/sys/class/block/{block.name}", block.sysfs)
        for slave in block.slaves:
            _link(root, f"{block.sysfs}/slaves/{slave}", blocks[slave].sysfs)
    nets = {n.name: n for n in spec.nets}
    for net in spec.nets:
        _write(root, f"{net.sysfs}/operstate", "up\n")
        _link(root, f"/sys/class/net/{net.name}", net.sysfs)
        if net.device:
            _link(root, f"{net.sysfs}/device", net.device)
        for lower in net.lowers:
            _link(root, f"{net.sysfs}/lower_{lower}", nets[lower].sysfs)


def _write_firmware_and_dev(root: Path, spec: Spec) -> None:
    if spec.efivars is not None:
        _mkdir(root, "/sys/firmware/efi/efivars")
        for name, data in spec.efivars.items():
            _write(root, f"/sys/firmware/efi/efivars/{name}", data)
    for module in spec.modules:
        _mkdir(root, f"/sys/module/{module}")
    _mkdir(root, "/dev")
    if spec.kvm:
        _write(root, "/dev/kvm", b"")
    for link, target in spec.dev_links.items():
        _write(root, target, b"")
        _link(root, link, target)


def build(kind: str, dest: Path) -> Path:
    """Write the fixture sysroot ``kind`` (one of KINDS) at ``dest``; returns ``dest``."""
    if kind not in SPECS:
        raise ValueError(f"unknown sysroot kind {kind!r}; expected one of {', '.join(KINDS)}")
    spec = SPECS[kind]
    dest.mkdir(parents=True, exist_ok=True)
    _write_proc(dest, spec)
    _write_pci(dest, spec.pci)
    _write_blocks_and_nets(dest, spec)
    _write_firmware_and_dev(dest, spec)
    return dest
