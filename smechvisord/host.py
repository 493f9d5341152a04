"""Read-only facts about the host, every one of them read through one sysroot.

The daemon never opens /proc, /sys or /dev directly: it asks a :class:`Host`, which maps
each absolute host path into ``SMECHVISORD_SYSROOT``. Tests point the sysroot at a
fixture tree; production leaves it at ``/``.

Symlinks are followed by :meth:`Host.resolve` as if the sysroot were ``/`` (the way
``chroot`` sees it): an absolute target starts again at the sysroot and ``..`` never
climbs above it. So a fixture tree, or a hostile link in one, cannot make the daemon read
outside the sysroot.

Fallbacks, per fact:

- /proc/cpuinfo, /proc/meminfo, /proc/uptime, /proc/loadavg, /proc/cmdline and
  /proc/sys/kernel/{hostname,osrelease} exist on every Linux host, so their absence means
  a wrong sysroot: reading them raises :class:`HostError` naming the file, never a guess.
  /proc/mounts and /proc/net/route are treated the same way, because guessing there
  would mark the root disk or the management NIC safe to detach.
- A missing ``MemAvailable`` (kernels before 3.14) is estimated from
  ``MemFree + Buffers + Cached``, as ``free`` did on those kernels.
- Presence checks (/dev/kvm, /sys/firmware/efi, /sys/module/vfio_pci) answer False or
  "bios" when absent: absence is the fact they report.
- A missing /sys/kernel/iommu_groups means no groups (the IOMMU is off).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Every file read here is small (cpuinfo of a 512-thread host is under 1 MiB); the cap keeps
# a wrong sysroot (a FIFO, /dev/zero, a huge file) from eating the daemon's memory.
READ_LIMIT = 4 * 1024 * 1024
READ_CHUNK = 64 * 1024

# Linux's own limit on symlinks followed in one lookup (MAXSYMLINKS).
MAX_SYMLINKS = 40

# A PCI address as sysfs spells it: domain:bus:device.function, lower-case hex.
BDF_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


class HostError(RuntimeError):
    """A host fact could not be read or parsed; the message names the file and the reason."""


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int
    threads: int
    flags: frozenset[str]
    vendor: str


class Host:
    """The host as seen through ``sysroot``; ``Host(Path("/"))`` is the real machine."""

    def __init__(self, sysroot: Path) -> None:
        self.sysroot = Path(sysroot)
        # With the real / as the sysroot, chroot-style resolution is what the kernel does
        # anyway: skip the per-component walk (it dominated GET /api/node's cost).
        self._native = self.sysroot.resolve() == Path("/")
        # Written once, read many times; two threads racing on the first call both compute
        # the same value, so no lock is needed.
        self._cpu: CpuInfo | None = None

    # -- paths -------------------------------------------------------------------------

    def resolve(self, host_path: str | PurePosixPath) -> PurePosixPath:
        """``host_path`` with every symlink followed inside the sysroot, as a host path.

        Components that do not exist are kept as written (like ``realpath -m``), so callers
        can resolve a path and then ask whether it exists. Raises HostError on a symlink
        loop.
        """
        if self._native:
            return PurePosixPath(os.path.realpath(PurePosixPath("/", host_path)))
        pending = [p for p in reversed(PurePosixPath(host_path).parts) if p != "/"]
        done: list[str] = []
        followed = 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                # Above the sysroot's top there is nothing: stay at the top, as chroot does.
                if done:
                    done.pop()
                continue
            target = self._readlink(self.sysroot.joinpath(*done, name))
            if target is None:
                done.append(name)
                continue
            followed += 1
            if followed > MAX_SYMLINKS:
                raise HostError(f"{host_path}: too many levels of symbolic links")
            if target.is_absolute():
                # An absolute target means the host's /, which is the sysroot.
                done = []
            pending.extend(p for p in reversed(target.parts) if p != "/")
        return PurePosixPath("/", *done)

    def path(self, host_path: str | PurePosixPath) -> Path:
        """The real path of ``host_path`` inside the sysroot, symlinks resolved (contained)."""
        if self._native:
            return Path("/", host_path)
        return self.sysroot.joinpath(*self.resolve(host_path).parts[1:])

    def exists(self, host_path: str | PurePosixPath) -> bool:
        return self.path(host_path).exists()

    def listdir(self, host_path: str | PurePosixPath) -> list[str]:
        """Sorted entry names of a directory; [] when it does not exist."""
        try:
            return sorted(entry.name for entry in self.path(host_path).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise HostError(f"cannot list {host_path}: {exc.strerror or exc}") from exc

    def link_name(self, host_path: str | PurePosixPath) -> str | None:
        """Last component of where the symlink ``host_path`` points, None if not a symlink.

        sysfs says "which driver" and "which IOMMU group" with symlinks (``driver ->
        ../../bus/pci/drivers/nvme``); the answer is the target's name.
        """
        parent = self.resolve(PurePosixPath(host_path).parent)
        link = parent / PurePosixPath(host_path).name
        if self._readlink(self.sysroot.joinpath(*link.parts[1:])) is None:
            return None
        return self.resolve(link).name or None

    @staticmethod
    def _readlink(path: Path) -> PurePosixPath | None:
        try:
            return PurePosixPath(path.readlink())
        except OSError:
            # Not a symlink, or not there: both mean "take the name as it is".
            return None

    def read_text(self, host_path: str | PurePosixPath, limit: int = READ_LIMIT) -> str:
        """The file's text, at most ``limit`` bytes; HostError when absent or larger."""
        text = self.read_optional(host_path, limit)
        if text is None:
            raise HostError(f"{host_path} does not exist under sysroot {self.sysroot}")
        return text

    def read_optional(self, host_path: str | PurePosixPath, limit: int = READ_LIMIT) -> str | None:
        """Like read_text, but None when the file does not exist."""
        try:
            data = _read_capped(self.path(host_path), limit)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise HostError(f"cannot read {host_path}: {exc.strerror or exc}") from exc
        if len(data) > limit:
            raise HostError(f"{host_path} is larger than {limit} bytes; refusing to parse it")
        # Kernel files are ASCII; a stray byte must not turn a fact into a crash.
        return data.decode("utf-8", errors="replace")

    # -- CPU and memory ----------------------------------------------------------------

    def cpu(self) -> CpuInfo:
        """Model, core and thread counts, flags. Read once: they do not change while we run."""
        if self._cpu is None:
            self._cpu = parse_cpuinfo(self.read_text("/proc/cpuinfo"))
        return self._cpu

    def memory(self) -> tuple[int, int]:
        """(total_mb, used_mb) in MiB; used is MemTotal - MemAvailable."""
        return parse_meminfo(self.read_text("/proc/meminfo"))

    # -- small /proc facts -------------------------------------------------------------

    def uptime_seconds(self) -> int:
        text = self.read_text("/proc/uptime")
        try:
            return int(float(text.split()[0]))
        except (IndexError, ValueError):
            raise HostError(f"/proc/uptime: cannot parse {text[:80]!r}") from None

    def loadavg(self) -> list[float]:
        text = self.read_text("/proc/loadavg")
        try:
            values = [float(field) for field in text.split()[:3]]
        except ValueError:
            raise HostError(f"/proc/loadavg: cannot parse {text[:80]!r}") from None
        if len(values) != 3:
            raise HostError(f"/proc/loadavg: expected 3 load averages, got {text[:80]!r}")
        return values

    def cmdline(self) -> list[str]:
        # Whitespace split, as the kernel's own parser does outside double quotes; IOMMU
        # flags never contain quotes.
        return self.read_text("/proc/cmdline").split()

    def hostname(self) -> str:
        return self.read_text("/proc/sys/kernel/hostname").strip()

    def kernel(self) -> str:
        return self.read_text("/proc/sys/kernel/osrelease").strip()

    # -- presence checks ---------------------------------------------------------------

    def kvm_available(self) -> bool:
        return self.exists("/dev/kvm")

    def boot_mode(self) -> str:
        return "uefi" if self.exists("/sys/firmware/efi") else "bios"

    def efivars_dir(self) -> Path:
        return self.path("/sys/firmware/efi/efivars")

    def vfio_loaded(self) -> bool:
        return self.exists("/sys/module/vfio_pci")

    # -- IOMMU, mounts, routes ---------------------------------------------------------

    def iommu_group_count(self) -> int:
        """How many IOMMU groups exist, without listing their members (cheap)."""
        return sum(1 for name in self.listdir("/sys/kernel/iommu_groups") if name.isdigit())

    def iommu_groups(self) -> dict[int, list[str]]:
        """IOMMU group number -> sorted PCI addresses in it; {} when the IOMMU is off."""
        groups: dict[int, list[str]] = {}
        for name in self.listdir("/sys/kernel/iommu_groups"):
            if name.isdigit():
                members = self.listdir(f"/sys/kernel/iommu_groups/{name}/devices")
                groups[int(name)] = [m for m in members if BDF_RE.fullmatch(m)]
        return groups

    def root_source(self) -> str | None:
        """What /proc/mounts says is mounted on / (the last such line: later mounts win)."""
        source = None
        for line in self.read_text("/proc/mounts").splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[1] == "/":
                source = fields[0]
        return source

    def default_route_interfaces(self) -> list[str]:
        """Interfaces of the IPv4 default routes in /proc/net/route, in table order."""
        interfaces: list[str] = []
        for line in self.read_text("/proc/net/route").splitlines()[1:]:
            fields = line.split()
            # Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            is_default = len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000"
            if is_default and fields[0] not in interfaces:
                interfaces.append(fields[0])
        return interfaces

    # -- GET /api/node -----------------------------------------------------------------

    def node_facts(self) -> dict[str, object]:
        """The host part of GET /api/node. Raises HostError when a required file is bad."""
        return {**self.steady_facts(), **self.live_facts()}

    def steady_facts(self) -> dict[str, object]:
        """Facts that change rarely if ever while the daemon runs (callers may cache)."""
        cpu = self.cpu()
        return {
            "cpu_model": cpu.model,
            "cpu_cores": cpu.cores,
            "cpu_threads": cpu.threads,
            "kvm_available": self.kvm_available(),
            "hostname": self.hostname(),
            "kernel": self.kernel(),
            "boot_mode": self.boot_mode(),
        }

    def live_facts(self) -> dict[str, object]:
        """Facts that move from second to second."""
        total_mb, used_mb = self.memory()
        return {
            "memory_total_mb": total_mb,
            "memory_used_mb": used_mb,
            "uptime_seconds": self.uptime_seconds(),
            "load_average": self.loadavg(),
        }


def _read_capped(path: Path, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes, in small reads.

    One big read() is not an option: /proc/sys handlers allocate a kernel buffer of the
    requested size and fail with ENOMEM for a few MiB. Reading until EOF (not until a short
    read) is what procfs needs too, since seq_file may return less than asked mid-file.
    """
    chunks: list[bytes] = []
    remaining = limit + 1
    with path.open("rb", buffering=0) as handle:
        while remaining > 0:
            chunk = handle.read(min(READ_CHUNK, remaining))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    return b"".join(chunks)


# -- parsers (pure: tests feed them text) --------------------------------------------------


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    """One dict per logical CPU: the ``key : value`` lines between blank lines."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not line.strip() or not sep:
            if current:
                blocks.append(current)
                current = {}
            continue
        current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return [b for b in blocks if "processor" in b]


def parse_cpuinfo(text: str) -> CpuInfo:
    blocks = _cpuinfo_blocks(text)
    if not blocks:
        raise HostError("/proc/cpuinfo: no 'processor' entries")
    first = blocks[0]
    pairs = {(b.get("physical id"), b.get("core id")) for b in blocks}
    # Cores are distinct (socket, core) pairs: core ids repeat on every socket. Without
    # those lines (many VMs, some arches) the logical count is the honest answer.
    has_topology = all("physical id" in b and "core id" in b for b in blocks)
    # Not every arch has "model name" (older arm64 kernels do not); "Hardware" or "cpu
    # model" name the chip there.
    model = first.get("model name") or first.get("cpu model") or first.get("Hardware") or ""
    return CpuInfo(
        model=" ".join(model.split()) or "unknown",
        cores=len(pairs) if has_topology else len(blocks),
        threads=len(blocks),
        flags=frozenset(first.get("flags", "").split()),
        vendor=first.get("vendor_id") or "unknown",
    )


_MEMINFO_KEYS = {
    key: re.compile(rf"^[ \t]*{key}:[ \t]+(\d+)(?:[ \t]+kB)?[ \t]*$", re.M)
    for key in ("MemTotal", "MemAvailable", "MemFree", "Buffers", "Cached")
}


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total_mb, used_mb) from /proc/meminfo, used = MemTotal - MemAvailable."""
    # Look up only the keys we use: parsing all ~55 lines cost more than the rest of a
    # GET /api/node request.
    values: dict[str, int] = {}
    for key, pattern in _MEMINFO_KEYS.items():
        match = pattern.search(text)
        if match:
            values[key] = int(match.group(1))
    total = values.get("MemTotal")
    if not total:
        raise HostError("/proc/meminfo: no usable 'MemTotal: <n> kB' line")
    available = values.get("MemAvailable")
    if available is None:
        # Kernels before 3.14 lack MemAvailable; this is what free(1) reported then.
        parts = ("MemFree", "Buffers", "Cached")
        if not all(p in values for p in parts):
            raise HostError("/proc/meminfo: neither MemAvailable nor MemFree/Buffers/Cached")
        available = sum(values[p] for p in parts)
    if available > total:
        raise HostError(f"/proc/meminfo: MemAvailable {available} kB exceeds MemTotal {total} kB")
    # Floor the difference once, so used never overstates by a rounding step.
    return total // 1024, (total - available) // 1024
