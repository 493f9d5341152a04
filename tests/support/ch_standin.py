"""A stand-in for cloud-hypervisor v42, for a test suite that has no real VMM to run.

It takes the v42 command line (and rejects what v42 rejects, with v42's exit codes and
messages), serves the REST API on the Unix socket with v42's status codes and plain-text
error bodies, writes the guest's serial and console output, the VMM log and the event
monitor stream, and exits the way v42 exits. There is no guest: a small script stands in
for the firmware and the kernel. Standard library only; one thread, idle in select().

Knobs, all from the environment:

- ``CH_STANDIN_SYSROOT`` (default ``/``): ``<sysroot>/dev/kvm`` must exist (and open
  read-write), else startup fails like v42 without KVM. VFIO ``--device path=`` paths are
  looked up under it too.
- ``CH_STANDIN_IGNORE_POWER_BUTTON=1``: the guest ignores the ACPI power button.
- ``CH_STANDIN_POWEROFF_DELAY`` (seconds, default 0.2): power button to guest power-off.
- ``CH_STANDIN_BOOT_FAIL=<msg>``: every boot fails with ``<msg>``.
- ``CH_STANDIN_REBOOT_AFTER`` (seconds): the guest reboots itself once, that long after
  its first boot.
- ``CH_STANDIN_POWEROFF_AFTER`` (seconds): the guest powers itself off that long after
  each boot.
- ``CH_STANDIN_SERIAL_FLOOD_MIB`` (MiB): after boot, the guest writes that much to its
  serial port, 256 KiB at a time, then ``flood done``: a guest filling the host's disk.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import os
import re
import selectors
import signal
import socket
import sys
import time

# Fifty of these start at once in the benchmark: typing, dataclasses and pathlib would add
# a good part of the start-up time, so they stay out of the run-time imports.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

BIN_NAME = "cloud-hypervisor"
BUILD_VERSION = "v42.0"
PKG_VERSION = "42.0.0"
FEATURES = ["kvm"]
SERVER_NAME = "Cloud Hypervisor API"
API_ROOT = "/api/v1/"
# micro_http's default request body limit; v42 does not raise it.
MAX_PAYLOAD = 51200
# micro_http has no such limit; this only bounds what a broken client can make us buffer.
MAX_HEAD = 64 * 1024
GUEST_HOSTNAME = "smechguest"

if TYPE_CHECKING:
    JsonDict = dict[str, Any]


# -- Rust-shaped error text ---------------------------------------------------------------

_ERR_KIND = {
    errno.ENOENT: "NotFound",
    errno.EACCES: "PermissionDenied",
    errno.EPERM: "PermissionDenied",
    errno.EADDRINUSE: "AddrInUse",
    errno.EADDRNOTAVAIL: "AddrNotAvailable",
    errno.EEXIST: "AlreadyExists",
    errno.ENOTDIR: "NotADirectory",
    errno.EISDIR: "IsADirectory",
    errno.EROFS: "ReadOnlyFilesystem",
    errno.EINVAL: "InvalidInput",
    errno.EBADF: "Uncategorized",
    errno.ECONNREFUSED: "ConnectionRefused",
    errno.ENAMETOOLONG: "InvalidFilename",
}


def io_display(err: OSError) -> str:
    """std::io::Error's Display for an OS error."""
    code = err.errno or 0
    return f"{os.strerror(code)} (os error {code})"


def io_debug(err: OSError) -> str:
    """std::io::Error's Debug for an OS error, as v42 prints it inside `{:?}` chains."""
    code = err.errno or 0
    if code == 0:
        return f'Custom {{ kind: InvalidInput, error: "{err}" }}'
    kind = _ERR_KIND.get(code, "Uncategorized")
    return f"Os {{ code: {code}, kind: {kind}, message: {json.dumps(os.strerror(code))} }}"


class ExitError(Exception):
    """Text for stderr and the exit status: 1 for cloud-hypervisor's errors, 2 for clap's."""

    def __init__(self, text: str, code: int = 1) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


class HelpRequested(Exception):
    pass


# -- the command line (clap 4, as v42 declares it) -----------------------------------------


class Opt:
    def __init__(
        self,
        name: str,
        kind: str,
        help: str,
        default: str | None = None,
        choices: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        # "one": one value; "many": one or more after a single flag; "flag": no value
        self.kind = kind
        self.help = help
        self.default = default
        self.choices = choices


OPTS: tuple[Opt, ...] = (
    Opt(
        "cpus",
        "one",
        "boot=<boot_vcpus>,max=<max_vcpus>,topology=<threads_per_core>:"
        "<cores_per_die>:<dies_per_package>:<packages>,kvm_hyperv=on|off,max_phys_bits=<bits>,"
        "affinity=<list_of_vcpus_with_their_associated_cpuset>,features=<list_of_features>",
        "boot=1,max_phys_bits=46",
    ),
    Opt(
        "platform",
        "one",
        "num_pci_segments=<num_pci_segments>,iommu_segments=<list_of_segments>,"
        "serial_number=<dmi_device_serial_number>,uuid=<dmi_device_uuid>,"
        "oem_strings=<list_of_strings>",
    ),
    Opt(
        "memory",
        "one",
        'Memory parameters "size=<guest_memory_size>,mergeable=on|off,'
        "shared=on|off,hugepages=on|off,hugepage_size=<hugepage_size>,"
        "hotplug_method=acpi|virtio-mem,hotplug_size=<hotpluggable_memory_size>,"
        'hotplugged_size=<hotplugged_memory_size>,prefault=on|off,thp=on|off"',
        "size=512M",
    ),
    Opt("memory-zone", "many", "User defined memory zone parameters"),
    Opt("firmware", "one", "Path to firmware that is loaded in an architectural specific way"),
    Opt(
        "kernel",
        "one",
        "Path to kernel to load. This may be a kernel or firmware that supports "
        "a PVH entry point (e.g. vmlinux) or architecture equivalent",
    ),
    Opt("initramfs", "one", "Path to initramfs image"),
    Opt("cmdline", "one", "Kernel command line"),
    Opt(
        "rate-limit-group",
        "many",
        "bw_size=<bytes>,bw_one_time_burst=<bytes>,"
        "bw_refill_time=<ms>,ops_size=<io_ops>,ops_one_time_burst=<io_ops>,"
        "ops_refill_time=<ms>,id=<device_id>",
    ),
    Opt(
        "disk",
        "many",
        "path=<disk_image_path>,readonly=on|off,direct=on|off,iommu=on|off,"
        "num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,vhost_user=on|off,"
        "socket=<vhost_user_socket_path>,id=<device_id>,pci_segment=<segment_id>,"
        "rate_limit_group=<group_id>,queue_affinity=<list_of_queue_indices_with_their_"
        "associated_cpuset>,serial=<serial_number>",
    ),
    Opt("landlock", "flag", "enable/disable Landlock."),
    Opt("landlock-rules", "many", "path=<path_to_file_or_directory>,access=[rw]"),
    Opt(
        "net",
        "many",
        "tap=<if_name>,ip=<ip_addr>,mask=<net_mask>,mac=<mac_addr>,"
        "fd=<fd1,fd2...>,iommu=on|off,num_queues=<number_of_queues>,"
        "queue_size=<size_of_each_queue>,id=<device_id>,vhost_user=<vhost_user_enable>,"
        "socket=<vhost_user_socket_path>,vhost_mode=client|server,pci_segment=<segment_id>,"
        "offload_tso=on|off,offload_ufo=on|off,offload_csum=on|off",
    ),
    Opt(
        "rng",
        "one",
        'Random number generator parameters "src=<entropy_source_path>,iommu=on|off"',
        "src=/dev/urandom",
    ),
    Opt("balloon", "one", "size=<balloon_size>,deflate_on_oom=on|off,free_page_reporting=on|off"),
    Opt(
        "fs",
        "many",
        "tag=<tag_name>,socket=<socket_path>,num_queues=<number_of_queues>,"
        "queue_size=<size_of_each_queue>,id=<device_id>,pci_segment=<segment_id>",
    ),
    Opt(
        "pmem",
        "many",
        "file=<backing_file_path>,size=<persistent_memory_size>,iommu=on|off,"
        "discard_writes=on|off,id=<device_id>,pci_segment=<segment_id>",
    ),
    Opt(
        "serial",
        "one",
        "Control serial port: off|null|pty|tty|file=</path/to/a/file>|socket=</path/to/a/file>",
        "null",
    ),
    Opt(
        "console",
        "one",
        'Control (virtio) console: "off|null|pty|tty|file=</path/to/a/file>,iommu=on|off"',
        "tty",
    ),
    Opt(
        "device",
        "many",
        "path=<device_path>,iommu=on|off,id=<device_id>,"
        "pci_segment=<segment_id>,x_nv_gpudirect_clique=<clique_id>",
    ),
    Opt("user-device", "many", "socket=<socket_path>,id=<device_id>,pci_segment=<segment_id>"),
    Opt(
        "vdpa",
        "many",
        "path=<device_path>,num_queues=<number_of_queues>,iommu=on|off,"
        "id=<device_id>,pci_segment=<segment_id>",
    ),
    Opt(
        "vsock",
        "one",
        "cid=<context_id>,socket=<socket_path>,iommu=on|off,id=<device_id>,"
        "pci_segment=<segment_id>",
    ),
    Opt("pvpanic", "flag", "Enable pvpanic device"),
    Opt(
        "numa",
        "many",
        "guest_numa_id=<node_id>,cpus=<cpus_id>,distances=<list_of_distances_to_"
        "destination_nodes>,memory_zones=<list_of_memory_zones>,"
        "sgx_epc_sections=<list_of_sgx_epc_sections>,pci_segments=<list_of_pci_segments>",
    ),
    Opt(
        "pci-segment",
        "many",
        "pci_segment=<segment_id>,mmio32_aperture_weight=<scale>,mmio64_aperture_weight=<scale>",
    ),
    Opt("watchdog", "flag", "Enable virtio-watchdog"),
    Opt("log-file", "one", "Log file. Standard error is used if not specified"),
    Opt(
        "api-socket",
        "one",
        "HTTP API socket (UNIX domain socket): path=</path/to/a/file> or fd=<fd>.",
    ),
    Opt("event-monitor", "one", "File to report events on: path=</path/to/a/file> or fd=<fd>"),
    Opt("restore", "one", "source_url=<source_url>,prefault=on|off"),
    Opt("seccomp", "one", "", "true", ("true", "false", "log")),
    Opt("tpm", "one", "socket=<path/to/a/socket>"),
    Opt("sgx-epc", "many", "id=<epc_section_identifier>,size=<epc_section_size>,prefault=on|off"),
    Opt(
        "debug-console",
        "one",
        "Debug console: off|pty|tty|file=</path/to/a/file>,iobase=<port in hex>",
        "off,iobase=0xe9",
    ),
)
OPT_BY_NAME = {o.name: o for o in OPTS}


def _arg_display(opt: Opt) -> str:
    if opt.kind == "flag":
        return f"--{opt.name}"
    dots = "..." if opt.kind == "many" else ""
    return f"--{opt.name} <{opt.name}>{dots}"


def _clap_error(message: str, tip: str = "", usage: bool = True) -> ExitError:
    text = f"error: {message}\n\n"
    if tip:
        text += f"  tip: {tip}\n\n"
    if usage:
        text += f"Usage: {BIN_NAME} [OPTIONS]\n\n"
    text += "For more information, try '--help'.\n"
    return ExitError(text, 2)


def _unexpected(token: str) -> ExitError:
    tip = ""
    if token.startswith("--"):
        # Only a failing command line pays for difflib's import.
        import difflib  # noqa: PLC0415

        close = difflib.get_close_matches(token[2:].partition("=")[0], OPT_BY_NAME, 1, 0.7)
        if close:
            tip = f"a similar argument exists: '--{close[0]}'"
    return _clap_error(f"unexpected argument '{token.partition('=')[0]}' found", tip)


def help_text() -> str:
    lines = ["Launch a cloud-hypervisor VMM.", "", f"Usage: {BIN_NAME} [OPTIONS]", "", "Options:"]
    for opt in OPTS:
        extra = f" [default: {opt.default}]" if opt.default else ""
        if opt.choices:
            extra += f" [possible values: {', '.join(opt.choices)}]"
        lines.append(f"      {_arg_display(opt)}  {opt.help}{extra}")
    lines.append("  -v...  Sets the level of debugging output")
    lines.append("  -V, --version  Print version")
    lines.append("  -h, --help  Print help")
    return "\n".join(lines) + "\n"


class Cli:
    def __init__(self) -> None:
        self.values: dict[str, list[str]] = {}
        self.flags: set[str] = set()
        self.verbosity = 0
        self.version = False

    def one(self, name: str) -> str | None:
        got = self.values.get(name)
        return got[0] if got else OPT_BY_NAME[name].default

    def many(self, name: str) -> list[str] | None:
        return self.values.get(name)

    def given(self, name: str) -> bool:
        return name in self.values


def _looks_like_flag(token: str) -> bool:
    return token.startswith("-") and len(token) > 1


def parse_cli(argv: list[str]) -> Cli:
    """clap's view of argv: one occurrence per option (v42 predates repeatable flags)."""
    if not argv:
        raise ExitError(help_text(), 2)
    cli = Cli()
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            if i < len(argv):
                raise _unexpected(argv[i])
            break
        if token.startswith("--"):
            name, eq, inline = token[2:].partition("=")
            if name == "help":
                raise HelpRequested
            if name == "version":
                if eq:
                    raise _clap_error(
                        f"unexpected value '{inline}' for '--version' found; no more were expected"
                    )
                if cli.version:
                    raise _clap_error("the argument '--version' cannot be used multiple times")
                cli.version = True
                continue
            opt = OPT_BY_NAME.get(name)
            if opt is None:
                raise _unexpected(token)
            if opt.kind == "flag":
                if eq:
                    raise _clap_error(
                        f"unexpected value '{inline}' for '--{name}' found; no more were expected"
                    )
                if name in cli.flags:
                    raise _clap_error(
                        f"the argument '{_arg_display(opt)}' cannot be used multiple times"
                    )
                cli.flags.add(name)
                continue
            if name in cli.values:
                raise _clap_error(
                    f"the argument '{_arg_display(opt)}' cannot be used multiple times"
                )
            got = [inline] if eq else []
            if opt.kind == "one" and not eq:
                if i < len(argv) and not _looks_like_flag(argv[i]):
                    got.append(argv[i])
                    i += 1
            elif opt.kind == "many":
                while i < len(argv) and not _looks_like_flag(argv[i]):
                    got.append(argv[i])
                    i += 1
            if not got:
                raise _clap_error(
                    f"a value is required for '{_arg_display(opt)}' but none was supplied",
                    usage=False,
                )
            if opt.choices and got[0] not in opt.choices:
                raise ExitError(
                    f"error: invalid value '{got[0]}' for '{_arg_display(opt)}'\n"
                    f"  [possible values: {', '.join(opt.choices)}]\n\n"
                    "For more information, try '--help'.\n",
                    2,
                )
            cli.values[name] = got
        elif _looks_like_flag(token):
            for ch in token[1:]:
                if ch == "v":
                    cli.verbosity += 1
                elif ch == "h":
                    raise HelpRequested
                elif ch == "V":
                    if cli.version:
                        raise _clap_error("the argument '--version' cannot be used multiple times")
                    cli.version = True
                else:
                    raise _unexpected(f"-{ch}")
        else:
            raise _unexpected(token)
    return cli


# -- option_parser: v42's key=value lists ---------------------------------------------------


class OptionError(Exception):
    """option_parser::OptionParserError; str() is its Display."""


def split_commas(text: str) -> list[str]:
    items: list[str] = []
    depth = 0
    quoted = False
    cur = ""
    for ch in text.strip():
        if ch == "[":
            depth += 1
            cur += ch
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise OptionError(f"invalid syntax:{text}")
            cur += ch
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not depth and not quoted:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    if depth or quoted:
        raise OptionError(f"invalid syntax:{text}")
    return items


class OptionParser:
    def __init__(self, names: tuple[str, ...], valueless: tuple[str, ...] = ()) -> None:
        self._needs_value = dict.fromkeys(names, True) | dict.fromkeys(valueless, False)
        self._values: dict[str, str] = {}

    def parse(self, text: str) -> None:
        if not text.strip():
            return
        for item in split_commas(text):
            key, eq, value = item.partition("=")
            needs = self._needs_value.get(key)
            if needs is None:
                raise OptionError(f"unknown option: {key}")
            if needs:
                if not eq:
                    raise OptionError(f"invalid syntax:{item}")
                self._values[key] = value.strip()
            else:
                self._values[key] = ""

    def get(self, name: str) -> str | None:
        return self._values.get(name) or None

    def is_set(self, name: str) -> bool:
        return name in self._values


_UINT_RE = re.compile(r"\+?[0-9]+")


def _to_uint(text: str, bits: int) -> int | None:
    if not _UINT_RE.fullmatch(text):
        return None
    value = int(text)
    return value if value < (1 << bits) else None


class Section:
    """One option's parsed key=value list, with v42's conversions and error wording."""

    def __init__(
        self,
        flag: str,
        text: str,
        names: tuple[str, ...],
        valueless: tuple[str, ...] = (),
        err_flag: str | None = None,
    ) -> None:
        self.prefix = f"Error parsing --{err_flag or flag}"
        self.p = OptionParser(names, valueless)
        try:
            self.p.parse(text)
        except OptionError as e:
            raise ConfigError(f"{self.prefix}: {e}") from None

    def fail(self, name: str, value: str) -> ConfigError:
        return ConfigError(f"{self.prefix}: unable to convert {value} for {name}")

    def get(self, name: str) -> str | None:
        return self.p.get(name)

    def is_set(self, name: str) -> bool:
        return self.p.is_set(name)

    def uint(self, name: str, bits: int, default: int | None = None) -> int | None:
        raw = self.p.get(name)
        if raw is None:
            return default
        value = _to_uint(raw, bits)
        if value is None:
            raise self.fail(name, raw)
        return value

    def toggle(self, name: str, default: bool) -> bool:
        raw = self.p.get(name)
        if raw is None:
            return default
        low = raw.lower()
        if low in ("on", "true"):
            return True
        if low in ("off", "false"):
            return False
        raise self.fail(name, raw)

    def size(self, name: str, default: int | None = None) -> int | None:
        raw = self.p.get(name)
        if raw is None:
            return default
        text = raw.strip()
        shift = {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
        digits = text.rstrip("KMG")
        value = _to_uint(digits, 64)
        if value is None or (value << shift) >= 1 << 64:
            # v42 reports the original value, not the stripped digits.
            raise self.fail(name, raw)
        return value << shift


class ConfigError(Exception):
    """vmm::config::Error; str() is its Display (prefixed by "Error parsing config: ")."""


# -- VmConfig, as v42 serialises it in vm.info ----------------------------------------------

DISK_KEYS = (
    "path",
    "readonly",
    "direct",
    "iommu",
    "queue_size",
    "num_queues",
    "vhost_user",
    "socket",
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
    "id",
    "_disable_io_uring",
    "_disable_aio",
    "pci_segment",
    "serial",
    "rate_limit_group",
    "queue_affinity",
)
NET_KEYS = (
    "tap",
    "ip",
    "mask",
    "mac",
    "host_mac",
    "offload_tso",
    "offload_ufo",
    "offload_csum",
    "mtu",
    "iommu",
    "queue_size",
    "num_queues",
    "vhost_user",
    "socket",
    "vhost_mode",
    "id",
    "fd",
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
    "pci_segment",
)
# Options the stand-in only checks for v42's keys and required fields.
PLAIN_OPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # flag: (keys, required keys)
    "memory-zone": (
        (
            "id",
            "size",
            "file",
            "shared",
            "hugepages",
            "hugepage_size",
            "host_numa_node",
            "hotplug_size",
            "hotplugged_size",
            "prefault",
        ),
        ("id",),
    ),
    "rate-limit-group": (
        (
            "bw_size",
            "bw_one_time_burst",
            "bw_refill_time",
            "ops_size",
            "ops_one_time_burst",
            "ops_refill_time",
            "id",
        ),
        (),
    ),
    "balloon": (("size", "deflate_on_oom", "free_page_reporting"), ()),
    "fs": (("tag", "queue_size", "num_queues", "socket", "id", "pci_segment"), ("tag", "socket")),
    "pmem": (("size", "file", "iommu", "discard_writes", "id", "pci_segment"), ("file",)),
    "user-device": (("socket", "id", "pci_segment"), ("socket",)),
    "vdpa": (("path", "num_queues", "iommu", "id", "pci_segment"), ("path",)),
    "vsock": (("cid", "socket", "iommu", "id", "pci_segment"), ("cid", "socket")),
    "numa": (
        ("guest_numa_id", "cpus", "distances", "memory_zones", "sgx_epc_sections", "pci_segments"),
        (),
    ),
    "pci-segment": (("pci_segment", "mmio32_aperture_weight", "mmio64_aperture_weight"), ()),
    "tpm": (("socket",), ("socket",)),
    "landlock-rules": (("path", "access"), ("path", "access")),
    "sgx-epc": (("id", "size", "prefault"), ("id",)),
}
MISSING_WORD = {"tpm": "path", "landlock-rules": "path/access field"}


def default_cpus(boot: int = 1) -> JsonDict:
    return {
        "boot_vcpus": boot,
        "max_vcpus": boot,
        "topology": None,
        "kvm_hyperv": False,
        "max_phys_bits": 46,
        "affinity": None,
        "features": {"amx": False},
    }


def default_memory(size: int = 512 << 20) -> JsonDict:
    return {
        "size": size,
        "mergeable": False,
        "hotplug_method": "Acpi",
        "hotplug_size": None,
        "hotplugged_size": None,
        "shared": False,
        "hugepages": False,
        "hugepage_size": None,
        "prefault": False,
        "zones": None,
        "thp": True,
    }


def default_disk() -> JsonDict:
    return {
        "path": None,
        "readonly": False,
        "direct": False,
        "iommu": False,
        "num_queues": 1,
        "queue_size": 128,
        "vhost_user": False,
        "vhost_socket": None,
        "rate_limit_group": None,
        "rate_limiter_config": None,
        "id": None,
        "disable_io_uring": False,
        "disable_aio": False,
        "pci_segment": 0,
        "serial": None,
        "queue_affinity": None,
    }


def random_mac() -> str:
    octets = list(os.urandom(6))
    # Locally administered unicast, as v42's MacAddr::local_random.
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def default_net() -> JsonDict:
    return {
        "tap": None,
        "ip": "192.168.249.1",
        "mask": "255.255.255.0",
        "mac": random_mac(),
        "host_mac": None,
        "mtu": None,
        "iommu": False,
        "num_queues": 2,
        "queue_size": 256,
        "vhost_user": False,
        "vhost_socket": None,
        "vhost_mode": "Client",
        "id": None,
        "fds": None,
        "rate_limiter_config": None,
        "pci_segment": 0,
        "offload_tso": True,
        "offload_ufo": True,
        "offload_csum": True,
    }


def default_console(mode: str) -> JsonDict:
    return {"file": None, "mode": mode, "iommu": False, "socket": None}


def default_device() -> JsonDict:
    return {
        "path": None,
        "iommu": False,
        "id": None,
        "pci_segment": 0,
        "x_nv_gpudirect_clique": None,
    }


def default_platform() -> JsonDict:
    return {
        "num_pci_segments": 1,
        "iommu_segments": None,
        "serial_number": None,
        "uuid": None,
        "oem_strings": None,
    }


def default_vm_config() -> JsonDict:
    return {
        "cpus": default_cpus(),
        "memory": default_memory(),
        "payload": None,
        "rate_limit_groups": None,
        "disks": None,
        "net": None,
        "rng": {"src": "/dev/urandom", "iommu": False},
        "balloon": None,
        "fs": None,
        "pmem": None,
        "serial": default_console("Null"),
        "console": default_console("Tty"),
        "debug_console": {"file": None, "mode": "Off", "iobase": 0xE9},
        "devices": None,
        "user_devices": None,
        "vdpa": None,
        "vsock": None,
        "pvpanic": False,
        "iommu": False,
        "sgx_epc": None,
        "numa": None,
        "watchdog": False,
        "pci_segments": None,
        "platform": None,
        "tpm": None,
        "landlock_enable": False,
        "landlock_rules": None,
    }


def parse_cpus(text: str) -> JsonDict:
    s = Section(
        "cpus",
        text,
        ("boot", "max", "topology", "kvm_hyperv", "max_phys_bits", "affinity", "features"),
    )
    boot = s.uint("boot", 8, 1)
    assert boot is not None
    cpus = default_cpus(boot)
    cpus["max_vcpus"] = s.uint("max", 8, boot)
    topology = s.get("topology")
    if topology is not None:
        parts = topology.split(":")
        if len(parts) != 4 or any(_to_uint(p, 8) is None for p in parts):
            raise s.fail("topology", topology)
        cpus["topology"] = dict(
            zip(
                ("threads_per_core", "cores_per_die", "dies_per_package", "packages"),
                (int(p) for p in parts),
                strict=True,
            )
        )
    cpus["kvm_hyperv"] = s.toggle("kvm_hyperv", False)
    cpus["max_phys_bits"] = s.uint("max_phys_bits", 8, 46)
    features = s.get("features")
    for feature in (features or "").strip("[]").split(","):
        if feature == "amx":
            cpus["features"]["amx"] = True
        elif feature:
            raise ConfigError(f"Invalid feature in --cpus features list: {feature}")
    return cpus


def parse_memory(text: str) -> JsonDict:
    s = Section(
        "memory",
        text,
        (
            "size",
            "file",
            "mergeable",
            "hotplug_method",
            "hotplug_size",
            "hotplugged_size",
            "shared",
            "hugepages",
            "hugepage_size",
            "prefault",
            "thp",
        ),
    )
    memory = default_memory(s.size("size", 512 << 20) or 0)
    memory["mergeable"] = s.toggle("mergeable", False)
    method = s.get("hotplug_method")
    if method is not None:
        names = {"acpi": "Acpi", "virtio-mem": "VirtioMem"}
        if method.lower() not in names:
            raise s.fail("hotplug_method", method)
        memory["hotplug_method"] = names[method.lower()]
    memory["hotplug_size"] = s.size("hotplug_size")
    memory["hotplugged_size"] = s.size("hotplugged_size")
    memory["shared"] = s.toggle("shared", False)
    memory["hugepages"] = s.toggle("hugepages", False)
    memory["hugepage_size"] = s.size("hugepage_size")
    memory["prefault"] = s.toggle("prefault", False)
    memory["thp"] = s.toggle("thp", True)
    return memory


def parse_disk(text: str) -> JsonDict:
    s = Section("disk", text, DISK_KEYS)
    disk = default_disk()
    disk["path"] = s.get("path")
    for key in ("readonly", "direct", "iommu", "vhost_user"):
        disk[key] = s.toggle(key, False)
    disk["queue_size"] = s.uint("queue_size", 16, 128)
    disk["num_queues"] = s.uint("num_queues", 64, 1)
    disk["vhost_socket"] = s.get("socket")
    disk["id"] = s.get("id")
    disk["disable_io_uring"] = s.toggle("_disable_io_uring", False)
    disk["disable_aio"] = s.toggle("_disable_aio", False)
    disk["pci_segment"] = s.uint("pci_segment", 16, 0)
    disk["serial"] = s.get("serial")
    disk["rate_limit_group"] = s.get("rate_limit_group")
    for key in (
        "bw_size",
        "bw_one_time_burst",
        "bw_refill_time",
        "ops_size",
        "ops_one_time_burst",
        "ops_refill_time",
    ):
        s.uint(key, 64, 0)
    return disk


def parse_net(text: str) -> JsonDict:
    s = Section("net", text, NET_KEYS)
    net = default_net()
    net["tap"] = s.get("tap")
    for key in ("ip", "mask"):
        value = s.get(key)
        if value is not None:
            if not re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})", value) or any(
                int(x) > 255 for x in value.split(".")
            ):
                raise s.fail(key, value)
            net[key] = value
    for key in ("mac", "host_mac"):
        value = s.get(key)
        if value is not None:
            if not re.fullmatch(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}", value):
                raise s.fail(key, value)
            net[key] = ":".join(f"{int(x, 16):02x}" for x in value.split(":"))
    for key in ("offload_tso", "offload_ufo", "offload_csum"):
        net[key] = s.toggle(key, True)
    net["mtu"] = s.uint("mtu", 16)
    net["iommu"] = s.toggle("iommu", False)
    net["queue_size"] = s.uint("queue_size", 16, 256)
    net["num_queues"] = s.uint("num_queues", 64, 2)
    net["vhost_user"] = s.toggle("vhost_user", False)
    net["vhost_socket"] = s.get("socket")
    mode = s.get("vhost_mode")
    if mode is not None:
        if mode.lower() not in ("client", "server"):
            raise s.fail("vhost_mode", mode)
        net["vhost_mode"] = mode.capitalize()
    net["id"] = s.get("id")
    net["pci_segment"] = s.uint("pci_segment", 16, 0)
    return net


def parse_console(text: str, flag: str) -> JsonDict:
    # v42 parses --serial with the --console parser, errors included.
    s = Section(
        flag, text, ("file", "iommu", "socket"), ("off", "pty", "tty", "null"), err_flag="console"
    )
    config = default_console("Off")
    for valueless, mode in (("off", "Off"), ("pty", "Pty"), ("tty", "Tty"), ("null", "Null")):
        if s.is_set(valueless):
            config["mode"] = mode
            break
    else:
        if s.is_set("file"):
            config["mode"] = "File"
            config["file"] = s.get("file")
            if config["file"] is None:
                raise ConfigError(
                    "Error validating configuration: Path missing when using file console mode"
                )
        elif s.is_set("socket"):
            config["mode"] = "Socket"
            config["socket"] = s.get("socket")
            if config["socket"] is None:
                raise ConfigError(
                    "Error validating configuration: Path missing when using socket console mode"
                )
        else:
            raise ConfigError("Error parsing --console: invalid console mode given")
    config["iommu"] = s.toggle("iommu", False)
    return config


def parse_device(text: str) -> JsonDict:
    s = Section("device", text, ("path", "id", "iommu", "pci_segment", "x_nv_gpudirect_clique"))
    device = default_device()
    device["path"] = s.get("path")
    if device["path"] is None:
        raise ConfigError("Error parsing --device: path missing")
    device["iommu"] = s.toggle("iommu", False)
    device["id"] = s.get("id")
    device["pci_segment"] = s.uint("pci_segment", 16, 0)
    device["x_nv_gpudirect_clique"] = s.uint("x_nv_gpudirect_clique", 8)
    return device


def parse_platform(text: str) -> JsonDict:
    s = Section(
        "platform",
        text,
        ("num_pci_segments", "iommu_segments", "serial_number", "uuid", "oem_strings"),
    )
    platform = default_platform()
    platform["num_pci_segments"] = s.uint("num_pci_segments", 16, 1)
    segments = s.get("iommu_segments")
    if segments is not None:
        values = [_to_uint(x, 16) for x in segments.strip("[]").split(",")]
        if any(v is None for v in values):
            raise s.fail("iommu_segments", segments)
        platform["iommu_segments"] = values
    platform["serial_number"] = s.get("serial_number")
    platform["uuid"] = s.get("uuid")
    oem = s.get("oem_strings")
    platform["oem_strings"] = oem.strip("[]").split(",") if oem is not None else None
    return platform


def parse_rng(text: str) -> JsonDict:
    s = Section("rng", text, ("src", "iommu"))
    return {"src": s.get("src") or "/dev/urandom", "iommu": s.toggle("iommu", False)}


def check_plain(flag: str, text: str) -> None:
    keys, required = PLAIN_OPTS[flag]
    s = Section(flag, text, keys)
    for key in required:
        if s.get(key) is None:
            raise ConfigError(f"Error parsing --{flag}: {MISSING_WORD.get(flag, key)} missing")


def validate_config(config: JsonDict) -> None:
    """The VmConfig::validate checks a launcher can trip over."""

    def invalid(why: str) -> ConfigError:
        return ConfigError(f"Error validating configuration: {why}")

    cpus = config["cpus"]
    if cpus["max_vcpus"] < cpus["boot_vcpus"]:
        raise invalid("Max CPUs lower than boot CPUs")
    segments = (config["platform"] or {}).get("num_pci_segments", 1)
    if not 1 <= segments <= 16:
        raise invalid(f"Number of PCI segments ({segments}) not in range of 1 to 16")
    for disk in config["disks"] or []:
        if disk["num_queues"] > cpus["boot_vcpus"]:
            raise invalid("Number of vCPUs is insufficient for number of queues")
        if disk["vhost_socket"] is not None and disk["path"] is not None:
            raise invalid("Disk path and vhost socket both provided")
    for net in config["net"] or []:
        if net["num_queues"] < 2:
            raise invalid("Number of queues to virtio_net less than 2")
        if net["num_queues"] // 2 > cpus["boot_vcpus"]:
            raise invalid("Number of vCPUs is insufficient for number of queues")
        if net["mtu"] is not None and net["mtu"] < 1280:
            raise invalid(
                f"Provided MTU {net['mtu']} is lower than 1280 (expected by VIRTIO specification)"
            )
        if not net["offload_csum"] and (net["offload_tso"] or net["offload_ufo"]):
            raise invalid('"offload_tso" and "offload_ufo" depend on "offload_csum"')
    ids: set[str] = set()
    for group in ("disks", "net", "devices", "fs", "pmem", "vdpa", "user_devices"):
        for item in config.get(group) or []:
            ident = item.get("id")
            if ident is None:
                continue
            if ident.startswith("__"):
                raise invalid(f"Identifier {ident} is invalid")
            if ident in ids:
                raise invalid(f"Identifier {ident} is not unique")
            ids.add(ident)
    paths: set[str] = set()
    for device in config["devices"] or []:
        path = os.path.normpath(device["path"])
        if path in paths:
            raise invalid(f"Duplicated device path: {device['path']}")
        paths.add(path)


def build_vm_config(cli: Cli) -> JsonDict:
    """VmConfig::parse of the command line; raises ConfigError."""
    config = default_vm_config()
    disks = cli.many("disk")
    if disks:
        config["disks"] = [parse_disk(d) for d in disks]
    nets = cli.many("net")
    if nets:
        config["net"] = [parse_net(n) for n in nets]
    config["rng"] = parse_rng(cli.one("rng") or "")
    for flag in PLAIN_OPTS:
        for text in cli.values.get(flag, []):
            check_plain(flag, text)
    config["console"] = parse_console(cli.one("console") or "", "console")
    config["serial"] = parse_console(cli.one("serial") or "", "serial")
    devices = cli.many("device")
    if devices:
        config["devices"] = [parse_device(d) for d in devices]
    platform = cli.one("platform")
    if platform is not None:
        config["platform"] = parse_platform(platform)
    config["cpus"] = parse_cpus(cli.one("cpus") or "")
    config["memory"] = parse_memory(cli.one("memory") or "")
    config["payload"] = {
        "firmware": cli.one("firmware"),
        "kernel": cli.one("kernel"),
        "cmdline": cli.one("cmdline"),
        "initramfs": cli.one("initramfs"),
    }
    config["pvpanic"] = "pvpanic" in cli.flags
    config["watchdog"] = "watchdog" in cli.flags
    config["landlock_enable"] = "landlock" in cli.flags
    validate_config(config)
    return config


CONSOLE_MODES = ("Off", "Pty", "Tty", "File", "Socket", "Null")


def normalize_api_config(body: Any) -> JsonDict:
    """A vm.create body as serde would take it, defaults filled in; raises ValueError."""
    if not isinstance(body, dict):
        raise ValueError(f"invalid type: {type(body).__name__}, expected struct VmConfig")
    config = default_vm_config()
    for key, value in body.items():
        config[key] = value

    def merged(value: Any, defaults: JsonDict, what: str) -> JsonDict:
        if not isinstance(value, dict):
            raise ValueError(f"invalid type: expected struct {what}")
        return defaults | value

    if "cpus" in body:
        cpus = merged(body["cpus"], default_cpus(), "CpusConfig")
        if "boot_vcpus" not in body["cpus"]:
            raise ValueError("missing field `boot_vcpus`")
        cpus.setdefault("max_vcpus", cpus["boot_vcpus"])
        config["cpus"] = cpus
    if "memory" in body:
        if not isinstance(body["memory"], dict) or "size" not in body["memory"]:
            raise ValueError("missing field `size`")
        config["memory"] = merged(body["memory"], default_memory(), "MemoryConfig")
    if body.get("payload") is not None:
        config["payload"] = merged(
            body["payload"],
            {"firmware": None, "kernel": None, "cmdline": None, "initramfs": None},
            "PayloadConfig",
        )
    for key, default in (
        ("disks", default_disk),
        ("net", default_net),
        ("devices", default_device),
    ):
        if body.get(key) is not None:
            if not isinstance(body[key], list):
                raise ValueError(f"invalid type: expected a sequence for `{key}`")
            config[key] = [merged(item, default(), key) for item in body[key]]
    for key, mode in (("serial", "Null"), ("console", "Tty")):
        if key in body:
            config[key] = merged(body[key], default_console(mode), "ConsoleConfig")
            if config[key]["mode"] not in CONSOLE_MODES:
                raise ValueError(
                    f"unknown variant `{config[key]['mode']}`, expected one of "
                    + ", ".join(f"`{m}`" for m in CONSOLE_MODES)
                )
    if body.get("platform") is not None:
        config["platform"] = merged(body["platform"], default_platform(), "PlatformConfig")
    for device in config["devices"] or []:
        if device.get("path") is None:
            raise ValueError("missing field `path`")
    return config


# -- Errors of the VMM, v42's wording ------------------------------------------------------


class VmError(Exception):
    """vm::Error: `display` is its Display, `debug` its Debug (what `{:?}` chains show)."""

    def __init__(self, display: str, debug: str) -> None:
        super().__init__(display)
        self.display = display
        self.debug = debug


def vm_not_running() -> VmError:
    return VmError("VM is not running", "VmNotRunning")


def vm_not_created() -> VmError:
    return VmError("VM is not created", "VmNotCreated")


class ApiFailure(Exception):
    """api::ApiError wrapping a VmError; the HTTP body is "Error from API: " + text."""

    def __init__(self, variant: str, display: str, err: VmError) -> None:
        super().__init__(display)
        self.text = f"{display}: {err.display}"
        self.debug = f"{variant}({err.debug})"


API_ERRORS = {
    # action: (ApiError variant, its Display prefix)
    "create": ("VmCreate", "The VM could not be created"),
    "boot": ("VmBoot", "The VM could not boot"),
    "info": ("VmInfo", "The VM info is not available"),
    "pause": ("VmPause", "The VM could not be paused"),
    "resume": ("VmResume", "The VM could not resume"),
    "shutdown": ("VmShutdown", "The VM could not shutdown"),
    "reboot": ("VmReboot", "The VM could not reboot"),
    "delete": ("VmDelete", "The VM could not be deleted"),
    "vmm-shutdown": ("VmmShutdown", "The VMM could not shutdown"),
    "power-button": ("VmPowerButton", "Error triggering power button"),
    "nmi": ("VmNmi", "Error triggering NMI"),
    "add-device": ("VmAddDevice", "The device could not be added to the VM"),
    "remove-device": ("VmRemoveDevice", "The device could not be removed from the VM"),
}


def api_failure(action: str, err: VmError) -> ApiFailure:
    variant, display = API_ERRORS[action]
    return ApiFailure(variant, display, err)


VALID_TRANSITIONS = {
    "Created": {"Running", "Paused", "Shutdown", "BreakPoint"},
    "Running": {"Paused", "Shutdown", "BreakPoint"},
    "Shutdown": {"Running"},
    "Paused": {"Running", "Shutdown"},
    "BreakPoint": {"Created", "Running"},
}


def transition_error(current: str, new: str) -> VmError | None:
    if new in VALID_TRANSITIONS[current]:
        return None
    return VmError(
        f"invalid VM state transition: {current} to {new}",
        f"InvalidStateTransition({current}, {new})",
    )


# -- Knobs ---------------------------------------------------------------------------------


class Knobs:
    def __init__(self, env: dict[str, str]) -> None:
        def seconds(name: str, default: float | None) -> float | None:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if value < 0:
                raise ExitError(
                    f"cloud-hypervisor stand-in: {name}={raw!r} is not a number of seconds"
                )
            return value

        self.sysroot = env.get("CH_STANDIN_SYSROOT") or "/"
        self.ignore_power_button = env.get("CH_STANDIN_IGNORE_POWER_BUTTON", "") not in ("", "0")
        self.poweroff_delay = seconds("CH_STANDIN_POWEROFF_DELAY", 0.2) or 0.0
        self.boot_fail = env.get("CH_STANDIN_BOOT_FAIL") or None
        self.reboot_after = seconds("CH_STANDIN_REBOOT_AFTER", None)
        self.poweroff_after = seconds("CH_STANDIN_POWEROFF_AFTER", None)
        self.serial_flood = int(seconds("CH_STANDIN_SERIAL_FLOOD_MIB", 0) or 0) << 20

    def host_path(self, path: str) -> str:
        return os.path.join(self.sysroot, path.lstrip("/"))


# -- Outputs: VMM log, event monitor, serial and console ------------------------------------


FLOOD_CHUNK = 256 << 10


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except InterruptedError:
            continue
        data = data[n:]


def rust_duration(seconds: float) -> str:
    """Rust's `{:.6?}` of a Duration."""
    if seconds >= 1:
        return f"{seconds:.6f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.6f}ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.6f}\u00b5s"
    return f"{seconds * 1e9:.6f}ns"


LEVELS = {"ERROR": 1, "WARN": 2, "INFO": 3, "DEBUG": 4, "TRACE": 5}


class VmmLog:
    """v42's logger: --log-file (created, truncated) or stderr; -v raises warn to info..."""

    def __init__(self, fd: int, verbosity: int) -> None:
        self.fd = fd
        self.max_level = min(2 + verbosity, 5)
        self.start = time.monotonic()

    def log(self, level: str, thread: str, where: str, message: str) -> None:
        if LEVELS[level] > self.max_level:
            return
        elapsed = rust_duration(time.monotonic() - self.start)
        line = f"cloud-hypervisor: {elapsed}: <{thread}> {level}:{where} -- {message}\r\n"
        with contextlib.suppress(OSError):
            _write_all(self.fd, line.encode())


class EventMonitor:
    """--event-monitor: v42 writes serde_json's pretty form, each event followed by a blank
    line (event_monitor crate + its writer thread), not one object per line."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.start = time.monotonic()

    def emit(self, source: str, event: str, properties: dict[str, str] | None = None) -> None:
        if self.fd is None:
            return
        elapsed = time.monotonic() - self.start
        secs = int(elapsed)
        record = {
            "timestamp": {"secs": secs, "nanos": int((elapsed - secs) * 1e9)},
            "source": source,
            "event": event,
            "properties": properties,
        }
        with contextlib.suppress(OSError):
            _write_all(self.fd, (json.dumps(record, indent=2) + "\n\n").encode())


class Sink:
    """Where one guest character device's output goes."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class FdSink(Sink):
    def __init__(self, fd: int, owned: bool) -> None:
        self.fd = fd
        self.owned = owned

    def write(self, data: bytes) -> None:
        # A pty nobody reads fills up: its output is dropped (EAGAIN) rather than stall the
        # API. stdout stays blocking, as it is shared with the parent.
        with contextlib.suppress(OSError):
            _write_all(self.fd, data)

    def close(self) -> None:
        if self.owned:
            with contextlib.suppress(OSError):
                os.close(self.fd)


class PtySink(FdSink):
    def __init__(self) -> None:
        # Only --serial/--console pty pays for these imports.
        import tty  # noqa: PLC0415

        main, sub = os.openpty()
        # v42 sets its ptys raw: the guest's bytes arrive as written, no line discipline.
        tty.setraw(sub)
        os.set_blocking(main, False)
        super().__init__(main, owned=True)
        # Kept open so writes to the main side do not fail with EIO before anyone attaches.
        self.sub = sub
        self.path = os.ttyname(sub)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            os.close(self.sub)


class SocketSink(Sink):
    """--serial socket=: v42 listens there and talks to one client at a time."""

    def __init__(self, path: str, loop: Loop, on_input: Callable[[bytes], None]) -> None:
        self.path = path
        self.loop = loop
        self.on_input = on_input
        self.client: socket.socket | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(path)
        except OSError:
            self.listener.close()
            raise
        self.listener.listen(1)
        self.listener.setblocking(False)
        loop.sel.register(self.listener, selectors.EVENT_READ, self._accept)

    def _accept(self, _mask: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        if self.client is not None:
            conn.close()
            return
        conn.setblocking(False)
        self.client = conn
        self.loop.sel.register(conn, selectors.EVENT_READ, self._client_input)

    def _client_input(self, _mask: int) -> None:
        if self.client is None:  # dropped earlier in this same pass of the loop
            return
        try:
            data = self.client.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()
            return
        self.on_input(data)

    def _drop_client(self) -> None:
        if self.client is not None:
            self.loop.sel.unregister(self.client)
            self.client.close()
            self.client = None

    def write(self, data: bytes) -> None:
        if self.client is None:
            return
        try:
            self.client.send(data)
        except OSError:
            self._drop_client()

    def close(self) -> None:
        self._drop_client()
        self.loop.sel.unregister(self.listener)
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


# -- The event loop ------------------------------------------------------------------------


class Loop:
    """select() plus timers: everything runs on the main thread, idle means blocked."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._seq = 0

    def call_later(self, delay: float, fn: Callable[[], None]) -> int:
        self._seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._seq, fn))
        return self._seq

    def cancel(self, handle: int | None) -> None:
        if handle is not None:
            self._cancelled.add(handle)

    def _next_timeout(self) -> float | None:
        while self._timers and self._timers[0][1] in self._cancelled:
            self._cancelled.discard(heapq.heappop(self._timers)[1])
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def run_once(self) -> None:
        for key, mask in self.sel.select(self._next_timeout()):
            callback: Callable[[int], None] = key.data
            callback(mask)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, handle, fn = heapq.heappop(self._timers)
            if handle in self._cancelled:
                self._cancelled.discard(handle)
                continue
            fn()


# -- The guest and the VMM -------------------------------------------------------------------


class Guest:
    """What v42 calls the Vm: exists from boot until shutdown."""

    def __init__(self) -> None:
        self.state = "Created"
        self.booted_at = 0.0
        self.timers: list[int] = []
        self.power_button_pending = False


FIRMWARE_HINTS = ("hypervisor-fw", "cloudhv", "ovmf", ".fd")


class Vmm:
    def __init__(self, loop: Loop, knobs: Knobs, log: VmmLog, events: EventMonitor) -> None:
        self.loop = loop
        self.knobs = knobs
        self.log = log
        self.events = events
        self.config: JsonDict | None = None
        self.guest: Guest | None = None
        self.serial: Sink | None = None
        self.console: Sink | None = None
        self.serial_socket: SocketSink | None = None
        self.rebooted_by_guest = False
        # DeviceManager's device_id_cnt: one counter for all prefixes, per built VM.
        self.id_counter = [0]
        # Set when the process should exit, to the exit status.
        self.exit_status: int | None = None

    # -- console devices (v42 opens them with the config, before the Vm exists) --

    def _open_console_devices(self, ptys: dict[str, PtySink] | None = None) -> None:
        """`ptys`: the ones a reboot carries over, as v42 hands them to the new Vm."""
        assert self.config is not None
        ptys = dict(ptys or {})
        sinks: list[Sink] = []
        try:
            for key in ("console", "serial"):
                cfg = self.config[key]
                mode = cfg["mode"]
                sink: Sink = Sink()
                if mode == "Tty":
                    sink = FdSink(1, owned=False)
                elif mode == "File":
                    # File::create: every (re)built VM starts the file over.
                    fd = os.open(
                        cfg["file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666
                    )
                    sink = FdSink(fd, owned=True)
                elif mode == "Pty":
                    pty = ptys.pop(key, None) or PtySink()
                    cfg["file"] = pty.path
                    sink = pty
                elif mode == "Socket" and key == "console":
                    raise VmError(
                        "Error creating console devices: No socket option support "
                        "for console device",
                        "CreateConsoleDevices(NoSocketOptionSupportForConsoleDevice)",
                    )
                sinks.append(sink)
        except OSError as e:
            for sink in [*sinks, *ptys.values()]:
                sink.close()
            raise VmError(
                f"Error creating console devices: Error creating console device: {io_display(e)}",
                f"CreateConsoleDevices(CreateConsoleDevice({io_debug(e)}))",
            ) from None
        except VmError:
            for sink in [*sinks, *ptys.values()]:
                sink.close()
            raise
        for unused in ptys.values():
            unused.close()
        self.console, self.serial = sinks

    def _close_console_devices(self) -> None:
        for sink in (self.console, self.serial, self.serial_socket):
            if sink is not None:
                sink.close()
        self.console = self.serial = self.serial_socket = None

    def _guest_out(self, text: str, kernel: bool = True) -> None:
        """Firmware output reaches the serial port only; the kernel's reaches both."""
        data = text.encode()
        for sink in (self.serial, self.serial_socket):
            if sink is not None:
                sink.write(data)
        if kernel and self.console is not None:
            self.console.write(data)

    def _serial_input(self, data: bytes) -> None:
        """Keystrokes on the serial port: the guest's getty answers Enter with a new prompt,
        so a client that attaches after boot can see the guest is up."""
        enter = b"\r" in data or b"\n" in data
        if enter and self.guest is not None and self.guest.state == "Running":
            self._guest_out(f"\r\n{GUEST_HOSTNAME} login: ")

    def _kernel_time(self) -> str:
        elapsed = time.monotonic() - self.guest.booted_at if self.guest else 0.0
        return f"[{elapsed:12.6f}]"

    # -- Vm::new: devices --

    def _next_id(self, prefix: str, used: set[str], counter: list[int]) -> str:
        while True:
            name = f"{prefix}{counter[0]}"
            counter[0] += 1
            if name not in used:
                used.add(name)
                return name

    def _assign_ids(self) -> None:
        assert self.config is not None
        used = {
            item["id"]
            for group in ("disks", "net", "devices")
            for item in self.config.get(group) or []
            if item.get("id")
        }
        counter = self.id_counter
        for group, prefix in (("disks", "_disk"), ("net", "_net"), ("devices", "_vfio")):
            for item in self.config.get(group) or []:
                if not item.get("id"):
                    item["id"] = self._next_id(prefix, used, counter)

    def _new_guest(self) -> Guest:
        assert self.config is not None
        self.id_counter = [0]
        self._assign_ids()
        for disk in self.config["disks"] or []:
            if disk["vhost_user"]:
                continue
            if disk["path"] is None:
                raise VmError("Error from device manager: NoDiskPath", "DeviceManager(NoDiskPath)")
            flags = os.O_RDONLY if disk["readonly"] else os.O_RDWR
            try:
                os.close(os.open(disk["path"], flags | os.O_CLOEXEC))
            except OSError as e:
                raise VmError(
                    f"Error from device manager: Disk({io_debug(e)})",
                    f"DeviceManager(Disk({io_debug(e)}))",
                ) from None
        for device in self.config["devices"] or []:
            if not os.path.exists(self.knobs.host_path(device["path"])):
                err = OSError(errno.ENOENT, os.strerror(errno.ENOENT))
                raise VmError(
                    f"Error from device manager: VfioCreate({io_debug(err)})",
                    f"DeviceManager(VfioCreate({io_debug(err)}))",
                )
        serial = self.config["serial"]
        if serial["mode"] == "Socket" and self.serial_socket is None:
            try:
                self.serial_socket = SocketSink(serial["socket"], self.loop, self._serial_input)
            except OSError as e:
                raise VmError(
                    f"Error from device manager: CreateSerialManager(BindListener({io_debug(e)}))",
                    f"DeviceManager(CreateSerialManager(BindListener({io_debug(e)})))",
                ) from None
        return Guest()

    # -- Vm::boot and the scripted guest --

    def _payload_error(self) -> VmError | None:
        assert self.config is not None
        payload = self.config["payload"] or {}
        firmware, kernel = payload.get("firmware"), payload.get("kernel")
        if firmware and not (kernel or payload.get("cmdline") or payload.get("initramfs")):
            path, variant, text = firmware, "FirmwareFile", "Error manipulating firmware file"
        elif kernel and not firmware:
            path, variant, text = kernel, "KernelFile", "Cannot open kernel file"
        else:
            return VmError("Payload configuration is not bootable", "InvalidPayload")
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            return VmError(f"{text}: {io_display(e)}", f"{variant}({io_debug(e)})")
        initramfs = payload.get("initramfs")
        if kernel and initramfs:
            try:
                os.close(os.open(initramfs, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                return VmError(
                    f"Cannot open initramfs file: {io_display(e)}", f"InitramfsFile({io_debug(e)})"
                )
        return None

    def _boot_guest(self, guest: Guest) -> None:
        """Vm::boot from Created; raises VmError."""
        self.log.log("INFO", "vmm", "vmm/src/vm.rs:2089", "Booting VM")
        self.events.emit("vm", "booting")
        bad = transition_error(guest.state, "Running")
        if bad is not None:
            raise bad
        err = self._payload_error()
        if err is not None:
            raise err
        if self.knobs.boot_fail:
            raise VmError(self.knobs.boot_fail, self.knobs.boot_fail)
        guest.state = "Running"
        guest.booted_at = time.monotonic()
        self.events.emit("vm", "booted")
        for group in ("disks", "net"):
            for item in (self.config or {}).get(group) or []:
                self.events.emit("virtio-device", "activated", {"id": item["id"]})
        self._run_guest_script(guest)

    def _run_guest_script(self, guest: Guest) -> None:
        assert self.config is not None
        payload = self.config["payload"] or {}
        loader = payload.get("firmware") or payload.get("kernel") or ""
        via_firmware = bool(payload.get("firmware")) or any(
            hint in os.path.basename(loader).lower() for hint in FIRMWARE_HINTS
        )
        disks = self.config["disks"] or []
        if via_firmware:
            self._guest_out(
                f"{os.path.basename(loader)}: cloud-hypervisor stand-in firmware, "
                f"{self.config['cpus']['boot_vcpus']} vCPU(s), "
                f"{self.config['memory']['size'] >> 20} MiB\r\n",
                kernel=False,
            )
            if not disks:
                self._guest_out("BdsDxe: No bootable option or device was found.\r\n", kernel=False)
                return
            self._guest_out(f"Booting from {disks[0]['path']}\r\n", kernel=False)
        cmdline = payload.get("cmdline") or "root=/dev/vda1 rw console=ttyS0 console=hvc0"
        self._guest_out(
            f"{self._kernel_time()} Linux version 6.1.0-{GUEST_HOSTNAME} "
            "(stand-in@smechvisor) #1 SMP PREEMPT_DYNAMIC\r\n"
            f"{self._kernel_time()} Command line: {cmdline}\r\n"
            f"\r\n{GUEST_HOSTNAME} login: "
        )
        knobs = self.knobs
        if knobs.reboot_after is not None and not self.rebooted_by_guest:
            guest.timers.append(self.loop.call_later(knobs.reboot_after, self._guest_reboots))
        if knobs.poweroff_after is not None:
            guest.timers.append(self.loop.call_later(knobs.poweroff_after, self._guest_powers_off))
        if knobs.serial_flood:
            flood = knobs.serial_flood
            guest.timers.append(self.loop.call_later(0.05, lambda: self._guest_floods(flood)))

    def _guest_floods(self, left: int) -> None:
        """A chatty (or hostile) guest: a chunk of serial output every 50 ms."""
        if self.guest is None or self.guest.state != "Running":
            return
        line = f"{self._kernel_time()} flood {left:>12}\r\n"
        chunk = min(left, FLOOD_CHUNK)
        self._guest_out(line * (chunk // len(line)) if chunk >= len(line) else line[:chunk])
        if left > chunk:
            rest = left - chunk
            self.guest.timers.append(self.loop.call_later(0.05, lambda: self._guest_floods(rest)))
        else:
            self._guest_out("flood done\r\n")

    def _stop_guest_timers(self, guest: Guest) -> None:
        for handle in guest.timers:
            self.loop.cancel(handle)
        guest.timers.clear()

    def _guest_powers_off(self) -> None:
        if self.guest is None or self.guest.state != "Running":
            return
        self._guest_out(f"\r\n{self._kernel_time()} reboot: Power down\r\n")
        self.log.log("INFO", "vmm", "vmm/src/lib.rs:904", "VM exit event")
        self.vmm_shutdown()
        self.exit_status = 0

    def _guest_reboots(self) -> None:
        if self.guest is None or self.guest.state != "Running":
            return
        self.rebooted_by_guest = True
        self._guest_out(f"\r\n{self._kernel_time()} reboot: Restarting system\r\n")
        self.log.log("INFO", "vmm", "vmm/src/lib.rs:912", "VM reset event")
        try:
            self.vm_reboot()
        except VmError as e:
            # v42 leaves its control loop with VmReboot(...) and exits 1.
            self.log.log("ERROR", "vmm", "vmm/src/lib.rs:912", f"Error rebooting VM: {e.debug}")
            sys.stderr.write(f"VMM thread exited with error: Error rebooting VM: {e.debug}\n")
            self.exit_status = 1

    def _shutdown_guest(self, guest: Guest) -> None:
        """Vm::shutdown: the guest is not asked."""
        bad = transition_error(guest.state, "Shutdown")
        if bad is not None:
            raise bad
        self._stop_guest_timers(guest)
        guest.state = "Shutdown"
        self._close_console_devices()
        self.events.emit("vm", "shutdown")

    # -- RequestHandler: what the API (and the command line) can ask --

    def vm_create(self, config: JsonDict) -> None:
        if self.config is not None:
            raise api_failure("create", VmError("VM is already created", "VmAlreadyCreated"))
        self.config = config
        try:
            self._open_console_devices()
        except VmError as e:
            self.config = None
            raise api_failure("create", e) from None

    def vm_boot(self) -> None:
        try:
            if self.config is None:
                raise VmError("VM config is missing", "VmMissingConfig")
            if self.guest is None:
                if self.console is None and self.serial is None:
                    self._open_console_devices()
                self.guest = self._new_guest()
            if self.guest.state == "Paused":
                self.events.emit("vm", "booting")
                self._resume_guest(self.guest)
                return
            self._boot_guest(self.guest)
        except VmError as e:
            raise api_failure("boot", e) from None

    def vm_pause(self) -> None:
        guest = self.guest
        if guest is None:
            raise api_failure("pause", vm_not_running())
        self.events.emit("vm", "pausing")
        bad = transition_error(guest.state, "Paused")
        if bad is not None:
            why = f"Invalid transition: {bad.debug}"
            raise api_failure(
                "pause",
                VmError(
                    f"Cannot pause VM: Failed to pause migratable component: {why}",
                    f"Pause(Pause({why}))",
                ),
            )
        guest.state = "Paused"
        self.events.emit("vm", "paused")

    def _resume_guest(self, guest: Guest) -> None:
        self.events.emit("vm", "resuming")
        bad = transition_error(guest.state, "Running")
        if bad is not None:
            why = f"Invalid transition: {bad.debug}"
            raise VmError(
                f"Cannot resume VM: Failed to resume migratable component: {why}",
                f"Resume(Resume({why}))",
            )
        guest.state = "Running"
        self.events.emit("vm", "resumed")
        if guest.power_button_pending:
            guest.power_button_pending = False
            self._press_power_button(guest)

    def vm_resume(self) -> None:
        if self.guest is None:
            raise api_failure("resume", vm_not_running())
        try:
            self._resume_guest(self.guest)
        except VmError as e:
            raise api_failure("resume", e) from None

    def vm_shutdown(self) -> None:
        guest = self.guest
        if guest is None:
            raise api_failure("shutdown", vm_not_running())
        try:
            self._shutdown_guest(guest)
        except VmError as e:
            raise api_failure("shutdown", e) from None
        self.guest = None

    def vm_reboot(self) -> None:
        """VMM-side rebuild of the VM in the same process; raises VmError."""
        guest = self.guest
        if guest is None:
            raise vm_not_created()
        self.events.emit("vm", "rebooting")
        ptys: dict[str, PtySink] = {}
        for key in ("console", "serial"):
            sink = getattr(self, key)
            if isinstance(sink, PtySink):
                ptys[key] = sink
                setattr(self, key, None)  # not closed with the old VM
        self._shutdown_guest(guest)
        self.guest = None
        self._open_console_devices(ptys)
        self.guest = self._new_guest()
        self._boot_guest(self.guest)
        self.events.emit("vm", "rebooted")

    def vm_reboot_api(self) -> None:
        try:
            self.vm_reboot()
        except VmError as e:
            raise api_failure("reboot", e) from None

    def vm_delete(self) -> None:
        if self.config is None:
            return
        if self.guest is not None:
            self.vm_shutdown()
        self._close_console_devices()
        self.config = None
        self.events.emit("vm", "deleted")

    def vmm_shutdown(self) -> None:
        self.vm_delete()
        self.events.emit("vmm", "shutdown")

    def vm_power_button(self) -> None:
        guest = self.guest
        if guest is None:
            raise api_failure("power-button", vm_not_running())
        if guest.state == "Paused":
            # The ACPI event waits in the device until the vCPUs run again.
            guest.power_button_pending = True
            return
        self._press_power_button(guest)

    def _press_power_button(self, guest: Guest) -> None:
        if guest.state != "Running" or self.knobs.ignore_power_button:
            return
        guest.timers.append(self.loop.call_later(self.knobs.poweroff_delay, self._guest_powers_off))

    def vm_nmi(self) -> None:
        if self.guest is None:
            raise api_failure("nmi", vm_not_running())

    def vm_info(self) -> JsonDict:
        if self.config is None:
            raise api_failure("info", vm_not_created())
        memory = self.config["memory"]
        size = memory["size"] + (memory.get("hotplugged_size") or 0)
        return {
            "config": self.config,
            "state": self.guest.state if self.guest else "Created",
            "memory_actual_size": size,
            "device_tree": self._device_tree() if self.guest else None,
        }

    def _pci_devices(self) -> list[tuple[str, str]]:
        assert self.config is not None
        found: list[tuple[str, str]] = []
        for group, kind in (("disks", "virtio"), ("net", "virtio"), ("devices", "vfio")):
            for item in self.config.get(group) or []:
                if item.get("id"):
                    found.append((item["id"], kind))
        return found

    def _device_tree(self) -> JsonDict:
        tree: JsonDict = {}
        for slot, (ident, kind) in enumerate(self._pci_devices(), start=1):
            bdf = f"0000:00:{slot:02x}.0"
            if kind == "virtio":
                pci_id = f"_virtio-pci-{ident}"
                tree[ident] = {
                    "id": ident,
                    "resources": [],
                    "parent": pci_id,
                    "children": [],
                    "pci_bdf": None,
                }
                tree[pci_id] = {
                    "id": pci_id,
                    "resources": [],
                    "parent": None,
                    "children": [ident],
                    "pci_bdf": bdf,
                }
            else:
                tree[ident] = {
                    "id": ident,
                    "resources": [],
                    "parent": None,
                    "children": [],
                    "pci_bdf": bdf,
                }
        return tree

    def vm_counters(self) -> JsonDict:
        if self.guest is None or self.config is None:
            raise api_failure("info", vm_not_running())
        up = int((time.monotonic() - self.guest.booted_at) * 1000) if self.guest.booted_at else 0
        counters: JsonDict = {}
        for disk in self.config["disks"] or []:
            counters[disk["id"]] = {
                "read_bytes": up * 4096,
                "read_ops": up,
                "write_bytes": up * 512,
                "write_ops": up // 8,
            }
        for net in self.config["net"] or []:
            counters[net["id"]] = {
                "rx_bytes": up * 64,
                "rx_frames": up,
                "tx_bytes": up * 32,
                "tx_frames": up // 2,
            }
        return counters

    def vm_add_device(self, body: Any) -> JsonDict | None:
        if self.config is None:
            raise api_failure("add-device", vm_not_created())
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise ValueError("missing field `path`")
        device = default_device() | body
        candidate = json.loads(json.dumps(self.config))
        candidate["devices"] = [*(candidate["devices"] or []), device]
        try:
            validate_config(candidate)
        except ConfigError as e:
            why = str(e).removeprefix("Error validating configuration: ")
            raise api_failure(
                "add-device",
                VmError(f"Failed to validate config: {why}", f"ConfigValidation({why})"),
            ) from None
        if self.guest is None:
            self.config["devices"] = candidate["devices"]
            return None
        if not os.path.exists(self.knobs.host_path(device["path"])):
            err = OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            raise api_failure(
                "add-device",
                VmError(
                    f"Error from device manager: VfioCreate({io_debug(err)})",
                    f"DeviceManager(VfioCreate({io_debug(err)}))",
                ),
            )
        self.config["devices"] = candidate["devices"]
        self._assign_ids()
        bdf = f"0000:00:{len(self._pci_devices()):02x}.0"
        return {"id": device["id"], "bdf": bdf}

    def vm_remove_device(self, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise ValueError("missing field `id`")
        if self.config is None:
            raise api_failure("remove-device", vm_not_created())
        for group in ("devices", "disks", "net"):
            items = self.config.get(group) or []
            kept = [item for item in items if item.get("id") != body["id"]]
            if len(kept) != len(items):
                self.config[group] = kept or None
                return
        raise api_failure(
            "remove-device",
            VmError(
                f"No device with id {json.dumps(body['id'])} to remove",
                f"NoDeviceToRemove({json.dumps(body['id'])})",
            ),
        )

    def close(self) -> None:
        if self.guest is not None:
            self._stop_guest_timers(self.guest)
        self._close_console_devices()


# -- HTTP, as micro_http speaks it -----------------------------------------------------------


class Request:
    def __init__(
        self, method: str, target: str, version: str, headers: dict[str, str], body: bytes | None
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body


def http_response(status: int, body: bytes = b"") -> bytes:
    # micro_http: no reason phrase; no Content-Type/Length on 204, both on everything else.
    head = f"HTTP/1.1 {status} \r\nServer: {SERVER_NAME}\r\nConnection: keep-alive\r\n"
    if status != 204:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def parse_error_response(reason: str) -> bytes:
    text = f'{{ "error": "{reason}\nAll previous unanswered requests will be dropped." }}'
    return http_response(400, text.encode())


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


class HttpConnection:
    def __init__(self, server: ApiServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.discard = 0
        self.after_discard: bytes | None = None
        self.sent_continue = False
        self.close_when_flushed = False
        self.closed = False
        sock.setblocking(False)
        server.loop.sel.register(sock, selectors.EVENT_READ, self.on_event)

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self._read()
        if not self.closed and mask & selectors.EVENT_WRITE:
            self.flush()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.inbuf += data
        self._process()
        self.flush()

    def _fail(self, reason: str) -> None:
        self.outbuf += parse_error_response(reason)
        self.close_when_flushed = True
        self.inbuf.clear()

    def _process(self) -> None:
        while not self.close_when_flushed and not self.server.vmm_exiting:
            if self.discard:
                n = min(self.discard, len(self.inbuf))
                del self.inbuf[:n]
                self.discard -= n
                if self.discard:
                    return
                if self.after_discard is not None:
                    self.outbuf += self.after_discard
                    self.after_discard = None
            end = self.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.inbuf) > MAX_HEAD:
                    self._fail("Request headers are too large.")
                return
            lines = bytes(self.inbuf[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                self._fail("Invalid request.")
                return
            method, target, version = parts
            if version not in ("HTTP/1.0", "HTTP/1.1"):
                self._fail("Unsupported HTTP version.")
                return
            if method not in METHODS:
                self._fail("Unsupported HTTP method.")
                return
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                if not colon or not name.strip():
                    self._fail("Invalid header.")
                    return
                headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding", "identity").lower() != "identity":
                self._fail("Unsupported transfer encoding.")
                return
            raw_length = headers.get("content-length", "0")
            if not raw_length.isdigit():
                self._fail("Invalid value. Key:Content-Length; Value:" + raw_length)
                return
            length = int(raw_length)
            if length > MAX_PAYLOAD:
                # The body still arrives; skip it so the connection stays usable.
                del self.inbuf[: end + 4]
                self.discard = length
                self.after_discard = parse_error_response(
                    f"Request payload with size {length} is larger than the limit of "
                    f"{MAX_PAYLOAD} allowed by server."
                )
                continue
            if len(self.inbuf) < end + 4 + length:
                if headers.get("expect", "").lower() == "100-continue" and not self.sent_continue:
                    self.sent_continue = True
                    self.outbuf += (
                        f"HTTP/1.1 100 \r\nServer: {SERVER_NAME}\r\nConnection: keep-alive\r\n\r\n"
                    ).encode()
                return
            body = bytes(self.inbuf[end + 4 : end + 4 + length]) if length else None
            del self.inbuf[: end + 4 + length]
            self.sent_continue = False
            request = Request(method, target, version, headers, body)
            self.outbuf += self.server.handle(request)
            connection = headers.get("connection", "").lower()
            if connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive"):
                self.close_when_flushed = True

    def flush(self) -> None:
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            del self.outbuf[:n]
        if self.outbuf:
            self.server.loop.sel.modify(
                self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self.on_event
            )
        elif self.close_when_flushed:
            self.close()
        else:
            self.server.loop.sel.modify(self.sock, selectors.EVENT_READ, self.on_event)

    def flush_blocking(self, deadline: float) -> None:
        """Before exiting: hand over what is left, within reason."""
        while self.outbuf and not self.closed and time.monotonic() < deadline:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            except OSError:
                break
            del self.outbuf[:n]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self.server.loop.sel.unregister(self.sock)
        self.sock.close()
        self.server.connections.discard(self)


# Route kinds: how v42's endpoint handlers treat methods and bodies.
GET_ONLY = "get"  # vmm.ping, vm.info: anything else is 400 "Bad Request"
ACTION_GET = "action-get"  # vm.counters
ACTION_PUT = "action-put"  # bodyless PUT actions
ACTION_BODY = "action-body"  # PUT actions that need a JSON body
CREATE = "create"
VMM_SHUTDOWN = "vmm-shutdown"

ROUTES: dict[str, tuple[str, str]] = {
    # endpoint: (kind, name in the VMM's "API request event" log line)
    "vmm.ping": (GET_ONLY, "VmmPing"),
    "vmm.shutdown": (VMM_SHUTDOWN, "VmmShutdown"),
    "vm.info": (GET_ONLY, "VmInfo"),
    "vm.counters": (ACTION_GET, "VmCounters"),
    "vm.create": (CREATE, "VmCreate"),
    "vm.boot": (ACTION_PUT, "VmBoot"),
    "vm.shutdown": (ACTION_PUT, "VmShutdown"),
    "vm.reboot": (ACTION_PUT, "VmReboot"),
    "vm.pause": (ACTION_PUT, "VmPause"),
    "vm.resume": (ACTION_PUT, "VmResume"),
    "vm.delete": (ACTION_PUT, "VmDelete"),
    "vm.power-button": (ACTION_PUT, "VmPowerButton"),
    "vm.nmi": (ACTION_PUT, "VmNmi"),
    "vm.add-device": (ACTION_BODY, "VmAddDevice"),
    "vm.remove-device": (ACTION_BODY, "VmRemoveDevice"),
    "vm.add-disk": (ACTION_BODY, "AddDisk"),
    "vm.add-fs": (ACTION_BODY, "VmAddFs"),
    "vm.add-net": (ACTION_BODY, "VmAddNet"),
    "vm.add-pmem": (ACTION_BODY, "VmAddPmem"),
    "vm.add-vdpa": (ACTION_BODY, "VmAddVdpa"),
    "vm.add-vsock": (ACTION_BODY, "VmAddVsock"),
    "vm.add-user-device": (ACTION_BODY, "VmAddUserDevice"),
    "vm.resize": (ACTION_BODY, "VmResize"),
    "vm.resize-zone": (ACTION_BODY, "VmResizeZone"),
    "vm.snapshot": (ACTION_BODY, "VmSnapshot"),
    "vm.restore": (ACTION_BODY, "VmRestore"),
    "vm.send-migration": (ACTION_BODY, "VmSendMigration"),
    "vm.receive-migration": (ACTION_BODY, "VmReceiveMigration"),
}


def _json_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _serde_error(e: ValueError) -> bytes:
    if isinstance(e, json.JSONDecodeError):
        text = f"{e.msg} at line {e.lineno} column {e.colno}"
    else:
        text = str(e)
    return f"Failed to deserialize JSON: {text}".encode()


class ApiServer:
    def __init__(self, loop: Loop, vmm: Vmm, log: VmmLog, listener: socket.socket) -> None:
        self.loop = loop
        self.vmm = vmm
        self.log = log
        self.listener = listener
        self.connections: set[HttpConnection] = set()
        # Set by vmm.shutdown: answer, stop reading, then the process exits.
        self.vmm_exiting = False
        listener.setblocking(False)
        loop.sel.register(listener, selectors.EVENT_READ, self._accept)

    def _accept(self, _mask: int) -> None:
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.connections.add(HttpConnection(self, sock))

    def handle(self, req: Request) -> bytes:
        path = req.target
        if path.startswith(("http://", "https://")):
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        path = path.partition("?")[0]
        route = ROUTES.get(path[len(API_ROOT) :]) if path.startswith(API_ROOT) else None
        if route is None:
            return http_response(404, b"Not Found")
        kind, action = route
        endpoint = path[len(API_ROOT) :]
        bad_request = http_response(400, b"Bad Request")
        if kind in (GET_ONLY, VMM_SHUTDOWN):
            if req.method != ("PUT" if kind == VMM_SHUTDOWN else "GET"):
                return bad_request
        elif kind == CREATE:
            if req.method != "PUT":
                return bad_request
            if req.body is None:
                return http_response(400)
        elif req.method not in ("GET", "PUT"):
            return http_response(400)
        elif (
            (req.method == "GET") != (kind == ACTION_GET)
            or (kind == ACTION_PUT and req.body is not None)
            or (kind == ACTION_BODY and req.body is None)
        ):
            return bad_request
        self.log.log("INFO", "vmm", "vmm/src/api/mod.rs:626", f"API request event: {action}")
        try:
            return self._dispatch(endpoint, req.body)
        except ApiFailure as e:
            return http_response(500, f"Error from API: {e.text}".encode())
        except ValueError as e:
            return http_response(400, _serde_error(e))

    def _dispatch(self, endpoint: str, body: bytes | None) -> bytes:
        vmm = self.vmm
        parsed: Any = json.loads(body) if body is not None else None
        if endpoint == "vmm.ping":
            return http_response(
                200,
                _json_body(
                    {
                        "build_version": BUILD_VERSION,
                        "version": PKG_VERSION,
                        "pid": os.getpid(),
                        "features": FEATURES,
                    }
                ),
            )
        if endpoint == "vmm.shutdown":
            vmm.vmm_shutdown()
            self.vmm_exiting = True
            vmm.exit_status = 0
            return http_response(200)
        if endpoint == "vm.info":
            return http_response(200, _json_body(vmm.vm_info()))
        if endpoint == "vm.counters":
            return http_response(200, _json_body(vmm.vm_counters()))
        if endpoint == "vm.create":
            vmm.vm_create(normalize_api_config(parsed))
            return http_response(204)
        if endpoint == "vm.add-device":
            info = vmm.vm_add_device(parsed)
            return http_response(200, _json_body(info)) if info else http_response(204)
        if endpoint == "vm.remove-device":
            vmm.vm_remove_device(parsed)
            return http_response(204)
        actions: dict[str, Callable[[], None]] = {
            "vm.boot": vmm.vm_boot,
            "vm.shutdown": vmm.vm_shutdown,
            "vm.reboot": vmm.vm_reboot_api,
            "vm.pause": vmm.vm_pause,
            "vm.resume": vmm.vm_resume,
            "vm.delete": vmm.vm_delete,
            "vm.power-button": vmm.vm_power_button,
            "vm.nmi": vmm.vm_nmi,
        }
        action = actions.get(endpoint)
        if action is None:
            return http_response(
                500,
                f"Error from API: {endpoint} is not implemented by the "
                "cloud-hypervisor stand-in".encode(),
            )
        action()
        return http_response(204)

    def close(self, deadline: float) -> None:
        for conn in list(self.connections):
            conn.flush_blocking(deadline)
            conn.close()
        with contextlib.suppress(KeyError, ValueError):
            self.loop.sel.unregister(self.listener)
        self.listener.close()


# -- Startup and shutdown ------------------------------------------------------------------


def _open_for_write(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)


class Standin:
    def __init__(self, cli: Cli, env: dict[str, str]) -> None:
        self.cli = cli
        self.env = env
        self.loop = Loop()
        self.log: VmmLog | None = None
        self.events = EventMonitor(None)
        self.vmm: Vmm | None = None
        self.api: ApiServer | None = None
        self.api_path: str | None = None
        self.signalled = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    # v42's start_vmm, step by step, up to a listening API socket.
    def start(self) -> None:
        cli = self.cli
        knobs = Knobs(self.env)
        log_file = cli.one("log-file")
        if log_file is not None:
            try:
                log_fd = _open_for_write(log_file)
            except OSError as e:
                raise ExitError(f"Error creating log file: {io_display(e)}") from None
        else:
            log_fd = sys.stderr.fileno()
        self.log = VmmLog(log_fd, cli.verbosity)

        api_path, api_fd = self._api_socket_arg()
        self._check_hypervisor(knobs)
        self._open_event_monitor()
        self.events.emit("vmm", "starting")
        self.vmm = Vmm(self.loop, knobs, self.log, self.events)
        self._install_signal_handlers()
        listener = self._bind_api(api_path, api_fd)
        if listener is not None:
            self.api = ApiServer(self.loop, self.vmm, self.log, listener)
            self.api_path = api_path

    def _api_socket_arg(self) -> tuple[str | None, int | None]:
        raw = self.cli.one("api-socket")
        if raw is None:
            return None, None
        parser = OptionParser(("path", "fd"))
        with contextlib.suppress(OptionError):
            parser.parse(raw)
        fd = parser.get("fd")
        if fd is not None:
            if not re.fullmatch(r"[+-]?[0-9]+", fd):
                raise ExitError("Error parsing --api-socket: invalid digit found in string")
            return None, int(fd)
        return parser.get("path") or raw, None

    def _check_hypervisor(self, knobs: Knobs) -> None:
        prefix = "Failed to open hypervisor interface (is hypervisor interface available?)"
        kvm = knobs.host_path("/dev/kvm")
        if not os.path.lexists(kvm):
            raise ExitError(f"{prefix}: Failed to create the hypervisor: no supported hypervisor")
        try:
            os.close(os.open(kvm, os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            raise ExitError(f"{prefix}: Failed to create Vm: {io_display(e)}") from None

    def _open_event_monitor(self) -> None:
        raw = self.cli.one("event-monitor")
        if raw is None:
            return
        parser = OptionParser(("path", "fd"))
        try:
            parser.parse(raw)
        except OptionError as e:
            raise ExitError(f"Error parsing --event-monitor: {e}") from None
        fd_text, path = parser.get("fd"), parser.get("path")
        if fd_text is not None:
            fd = _to_uint(fd_text, 31)
            if fd is None:
                raise ExitError(
                    f"Error parsing --event-monitor: unable to convert {fd_text} for fd"
                )
            self.events = EventMonitor(fd)
        elif path is not None:
            try:
                self.events = EventMonitor(_open_for_write(path))
            except OSError as e:
                raise ExitError(f"Error doing event monitor I/O: {io_display(e)}") from None
        else:
            raise ExitError("Error parsing --event-monitor: path or fd required")

    def _bind_api(self, path: str | None, fd: int | None) -> socket.socket | None:
        if fd is not None:
            try:
                listener = socket.socket(fileno=fd)
                listener.listen(128)
            except OSError as e:
                raise ExitError(
                    f"Failed to start the VMM thread: Error creating API server {io_debug(e)}"
                ) from None
            return listener
        if path is None:
            return None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(128)
        except OSError as e:
            listener.close()
            detail = io_debug(e)
            if e.errno is None:
                detail = 'Custom { kind: InvalidInput, error: "path must be shorter than SUN_LEN" }'
            raise ExitError(
                f"Failed to start the VMM thread: Error creation API server's socket {detail}"
            ) from None
        return listener

    def _install_signal_handlers(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        # A signal's handler runs between selects; the wakeup byte makes the select return.
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self.loop.sel.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeup)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.signalled = True

    def _drain_wakeup(self, _mask: int) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(OSError):
            self._wake_r.recv(512)

    def boot_from_cli(self) -> None:
        """A payload on the command line: vm.create + vm.boot, as v42's main does."""
        assert self.vmm is not None
        try:
            config = build_vm_config(self.cli)
        except ConfigError as e:
            raise ExitError(f"Error parsing config: {e}") from None
        try:
            self.vmm.vm_create(config)
        except ApiFailure as e:
            raise ExitError(f"Error creating VM: {e.debug}") from None
        try:
            self.vmm.vm_boot()
        except ApiFailure as e:
            raise ExitError(f"Error booting VM: {e.debug}") from None

    def run(self) -> int:
        try:
            self.start()
        except ExitError as e:
            _eprint(e.text)
            return e.code
        assert self.vmm is not None
        payload = self.cli.given("kernel") or self.cli.given("firmware")
        try:
            if payload:
                self.boot_from_cli()
            elif self.cli.given("restore"):
                raise ExitError(
                    "Error restoring VM: VmRestore(Restore(the cloud-hypervisor "
                    "stand-in cannot restore snapshots))"
                )
        except ExitError as e:
            # v42 stops its VMM thread cleanly but returns the error: the API socket file
            # stays behind, only a successful exit removes it.
            self.vmm.vmm_shutdown()
            self._teardown(remove_api_socket=False)
            _eprint(e.text)
            return e.code
        while self.vmm.exit_status is None:
            self.loop.run_once()
            if self.signalled and self.vmm.exit_status is None:
                self.vmm.vmm_shutdown()
                self.vmm.exit_status = 0
        status = self.vmm.exit_status
        self._teardown(remove_api_socket=status == 0)
        return status

    def _teardown(self, remove_api_socket: bool) -> None:
        if self.api is not None:
            self.api.close(time.monotonic() + 1.0)
            if remove_api_socket and self.api_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.api_path)
        if self.vmm is not None:
            self.vmm.close()
        with contextlib.suppress(OSError):
            sys.stdout.flush()


def _eprint(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    # v42 first thing: created files (sockets, serial file, log) are owner-only.
    os.umask(0o077)
    args = sys.argv[1:] if argv is None else argv
    try:
        cli = parse_cli(args)
    except HelpRequested:
        sys.stdout.write(help_text())
        return 0
    except ExitError as e:
        _eprint(e.text)
        return e.code
    if cli.version:
        print(f"{BIN_NAME} {BUILD_VERSION}")
        if cli.verbosity:
            print(f"Enabled features: {json.dumps(FEATURES)}")
        return 0
    return Standin(cli, dict(os.environ)).run()


if __name__ == "__main__":
    sys.exit(main())
