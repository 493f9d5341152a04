"""IOMMU readiness: the three checks of GET /api/iommu, each reported on its own.

(1) ``vmx`` (Intel VT-x) or ``svm`` (AMD-V) among the CPU flags; (2) at least one group
under /sys/kernel/iommu_groups; (3) ``intel_iommu=on`` or ``amd_iommu=on`` on the kernel
command line. Every failing check gives one blocker: a sentence saying what is wrong and
what to do, so the dashboard and the CLI can show it as it is.
"""

from __future__ import annotations

from smechvisord.host import Host

CHECK_CPU = "cpu_virtualization"
CHECK_GROUPS = "iommu_groups"
CHECK_CMDLINE = "kernel_cmdline"
CHECK_IDS = (CHECK_CPU, CHECK_GROUPS, CHECK_CMDLINE)

# The parameters that switch the IOMMU on. The kernel reads intel_iommu= as a comma list
# (intel_iommu=on,sm_on); amd_iommu=on is the form this product's boot loader writes.
ENABLE_KEYS = ("intel_iommu", "amd_iommu")


def _check(check_id: str, ok: bool, label: str, detail: str, fix: str) -> dict[str, object]:
    return {"id": check_id, "ok": ok, "label": label, "detail": detail, "fix": "" if ok else fix}


def _last_values(cmdline: list[str]) -> dict[str, str]:
    """key -> value of key=value tokens; a later token wins, as it does in the kernel."""
    values: dict[str, str] = {}
    for token in cmdline:
        key, sep, value = token.partition("=")
        if sep:
            values[key] = value
    return values


def iommu_tokens(cmdline: list[str]) -> list[str]:
    """The IOMMU-related tokens (intel_iommu=, amd_iommu=, iommu=, iommu.*=), in order."""
    return [t for t in cmdline if "iommu" in t.partition("=")[0]]


def iommu_enabled_by(cmdline: list[str]) -> list[str]:
    """The tokens that turn the IOMMU on (``intel_iommu=on``...); [] when none does."""
    values = _last_values(cmdline)
    return [f"{key}={values[key]}" for key in ENABLE_KEYS if "on" in values.get(key, "").split(",")]


def passthrough_mode(cmdline: list[str]) -> bool:
    """iommu=pt, or its newer spelling iommu.passthrough=1: host devices skip translation."""
    values = _last_values(cmdline)
    return values.get("iommu") == "pt" or values.get("iommu.passthrough") in ("1", "on", "y")


def _cpu_check(virtualization: str | None) -> dict[str, object]:
    names = {"vmx": "vmx (Intel VT-x)", "svm": "svm (AMD-V)"}
    detail = (
        f"{names[virtualization]} among the CPU flags"
        if virtualization
        else "neither vmx nor svm among the CPU flags in /proc/cpuinfo"
    )
    fix = (
        "Enable Intel VT-x or AMD-V (SVM) in firmware setup; if this node is itself a VM, "
        "enable nested virtualization on its host"
    )
    return _check(CHECK_CPU, virtualization is not None, "CPU virtualization", detail, fix)


def _groups_check(count: int) -> dict[str, object]:
    noun = "group" if count == 1 else "groups"
    detail = (
        f"{count} IOMMU {noun} under /sys/kernel/iommu_groups"
        if count
        else "no groups under /sys/kernel/iommu_groups"
    )
    fix = "Enable VT-d / AMD-Vi in firmware setup"
    return _check(CHECK_GROUPS, count > 0, "IOMMU groups", detail, fix)


def _cmdline_check(enabled_by: list[str], passthrough: bool, vendor_flag: str) -> dict[str, object]:
    if enabled_by:
        detail = f"{' and '.join(enabled_by)} on the kernel command line"
        detail += ", with iommu=pt" if passthrough else ", without iommu=pt"
    else:
        detail = "neither intel_iommu=on nor amd_iommu=on on /proc/cmdline"
    fix = (
        f"Add {vendor_flag} iommu=pt to the kernel command line in the boot loader "
        "configuration, then reboot"
    )
    return _check(CHECK_CMDLINE, bool(enabled_by), "Kernel command line", detail, fix)


# What is wrong, per check; the blocker is "<problem>: <fix>".
_PROBLEMS = {
    CHECK_CPU: "CPU virtualization is unavailable (no vmx or svm flag)",
    CHECK_GROUPS: "IOMMU groups are empty",
    CHECK_CMDLINE: "The kernel command line lacks intel_iommu=on or amd_iommu=on",
}


def _blocker(check: dict[str, object]) -> str:
    fix = str(check["fix"])
    return f"{_PROBLEMS[str(check['id'])]}: {fix[:1].lower()}{fix[1:]}"


def _vendor_flag(virtualization: str | None, vendor: str) -> str:
    """The enable flag for this CPU, so the fix names one thing to type."""
    if virtualization == "vmx" or vendor == "GenuineIntel":
        return "intel_iommu=on"
    if virtualization == "svm" or vendor == "AuthenticAMD":
        return "amd_iommu=on"
    return "intel_iommu=on (Intel) or amd_iommu=on (AMD)"


def readiness(host: Host) -> dict[str, object]:
    """GET /api/iommu. Raises HostError when /proc/cpuinfo or /proc/cmdline is unreadable."""
    cpu = host.cpu()
    virtualization = "vmx" if "vmx" in cpu.flags else "svm" if "svm" in cpu.flags else None
    group_count = host.iommu_group_count()
    cmdline = host.cmdline()
    passthrough = passthrough_mode(cmdline)
    checks = [
        _cpu_check(virtualization),
        _groups_check(group_count),
        _cmdline_check(
            iommu_enabled_by(cmdline), passthrough, _vendor_flag(virtualization, cpu.vendor)
        ),
    ]
    blockers = [_blocker(c) for c in checks if not c["ok"]]
    return {
        "ready": not blockers,
        "blockers": blockers,
        "checks": checks,
        "cpu_virtualization": virtualization,
        "iommu_groups": group_count,
        "cmdline_flags": iommu_tokens(cmdline),
        "iommu_passthrough": passthrough,
    }
