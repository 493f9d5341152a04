"""The image's tree: mmdebstrap, then the node's files and contracts, pruning and sealing.

Order matters: everything that runs a tool inside the chroot (rc-update, depmod,
update-initramfs, compileall, spk-visor --version) happens before `seal`, which removes
the package managers those tools never need.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import zstandard

import smechvisord
from spk_visor.image import nodefiles
from spk_visor.image.pyenv import chroot, run

SUITE = "bookworm"
# OpenRC as init (no systemd), the kernel, python3, sshd, and what the node's contracts
# call: mount/lsblk/findmnt (spk-visor-data), grub-editenv (OTA's A/B one-shot),
# ifupdown + dhclient (networking), ca-certificates (OTA pulls over https).
PACKAGES = (
    *("sysvinit-core", "openrc", "python3", "openssh-server", "linux-image-amd64"),
    *("initramfs-tools", "zstd", "udev", "kmod", "mount", "util-linux", "e2fsprogs"),
    *("iproute2", "ifupdown", "isc-dhcp-client", "procps", "grub-common", "ca-certificates"),
    # The daemon makes its TLS certificate with it at first start (smechvisord/tls.py).
    "openssl",
    # The node pulls its own updates on a schedule (/etc/cron.d/spk-visor-ota).
    "cron",
)
# Path globs dpkg never unpacks (mmdebstrap's documented way to drop docs and locales).
DPKG_EXCLUDE = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
    "/usr/share/linda/*",
    "/usr/share/bug/*",
)
DPKG_INCLUDE = ("/usr/share/doc/*/copyright", "/usr/share/locale/locale.alias")
# Kernel module trees a hypervisor host never loads: sound, radio, cameras, consumer
# GPUs (passthrough binds vfio-pci, not these), staging drivers, exotic file systems.
MODULE_PRUNE = (
    "sound",
    "drivers/media",
    "drivers/net/wireless",
    "net/wireless",
    "net/mac80211",
    "drivers/staging",
    "drivers/gpu/drm/amd",
    "drivers/gpu/drm/nouveau",
    "drivers/gpu/drm/i915",
    "drivers/gpu/drm/radeon",
    "drivers/infiniband",
    "drivers/isdn",
    "drivers/bluetooth",
    "net/bluetooth",
    "drivers/iio",
    "drivers/input/joystick",
    "drivers/input/touchscreen",
    "drivers/input/tablet",
    "drivers/net/can",
    "net/can",
    "drivers/usb/gadget",
    "drivers/mtd",
    "drivers/w1",
    "drivers/nfc",
    "net/nfc",
    "drivers/atm",
    "net/atm",
    "drivers/net/wwan",
    "drivers/net/ieee802154",
    "net/ieee802154",
    "drivers/hwmon/pmbus",
    "fs/ocfs2",
    "fs/gfs2",
    "fs/ubifs",
    "fs/jffs2",
    "fs/nilfs2",
    "fs/reiserfs",
    "fs/jfs",
    "fs/hfs",
    "fs/hfsplus",
    "fs/ufs",
)
# Left after the build: caches, logs, package indexes, the build's own traces.
DROP = (
    "var/cache/apt",
    "var/cache/debconf",
    "var/cache/ldconfig",
    "var/lib/apt",
    "var/log",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/pydoc_data",
    "vmlinuz",
    "vmlinuz.old",
    "initrd.img",
    "initrd.img.old",
    "boot/vmlinuz.old",
    "boot/initrd.img.old",
)
MODULE_ZSTD_LEVEL = 12
SERVICES_DEFAULT = ("smechvisord", "spk-visor-ota", "vhost-user-gpu")
# Daily jobs of the package managers the seal removes (they would fail every day).
SEALED_CRON_JOBS = ("etc/cron.daily/apt-compat", "etc/cron.daily/dpkg")
# Stubs even where the image never had the command: the answer is "sealed", not "not found".
ALWAYS_SEALED = ("apt", "apt-get", "dpkg", "pip", "pip3")
# Names that would make the node able to build code (none must be in the image).
COMPILERS = ("cc", "c++", "gcc", "g++", "clang", "tcc", "as", "ld", "rustc", "go", "make")
Progress = Callable[[str], None]


def debootstrap(root: Path, sources: Path, epoch: int, progress: Progress) -> None:
    """Debian 12 minbase plus PACKAGES into `root` (created), through apt only."""
    progress(f"mmdebstrap {SUITE} ({len(PACKAGES)} packages and their dependencies)")
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory", "--quiet"]
    argv += ["--include=" + ",".join(PACKAGES)]
    argv += ['--aptopt=APT::Install-Recommends "false"', '--aptopt=Acquire::Languages "none"']
    argv += [f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDE]
    argv += [f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDE]
    # Kernel postinst: links at /boot/vmlinuz and /boot/initrd.img (the boot contract).
    argv += ["--essential-hook=echo 'link_in_boot = yes' > \"$1/etc/kernel-img.conf\""]
    argv += [SUITE, str(root), str(sources)]
    run(argv, env={"SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C.UTF-8"})


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)
    return path


def _link(root: Path, rel: str, target: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.symlink_to(target)


def kernel_version(root: Path) -> str:
    versions = sorted(p.name for p in (root / "lib/modules").iterdir() if p.is_dir())
    if len(versions) != 1:
        raise ValueError(f"expected one kernel in the image, found {versions}")
    return versions[0]


def compress_modules(kernel: Path) -> int:
    """Every module .ko -> .ko.zst (kmod 30 decompresses them; about a quarter of the
    size). Returns the bytes saved."""
    compressor = zstandard.ZstdCompressor(level=MODULE_ZSTD_LEVEL, write_checksum=True)
    saved = 0
    for module in sorted(kernel.rglob("*.ko")):
        data = module.read_bytes()
        packed = compressor.compress(data)
        dest = module.with_name(module.name + ".zst")
        dest.write_bytes(packed)
        dest.chmod(module.stat().st_mode & 0o777)
        module.unlink()
        saved += len(data) - len(packed)
    return saved


def prune(root: Path, epoch: int, progress: Progress) -> None:
    """Modules a hypervisor never loads, then a fresh initramfs without them."""
    kver = kernel_version(root)
    kernel = root / "lib/modules" / kver / "kernel"
    progress(f"pruning kernel modules of {kver}")
    for rel in MODULE_PRUNE:
        shutil.rmtree(kernel / rel, ignore_errors=True)
    compress_modules(kernel)
    chroot(root, ["depmod", "-a", kver])
    for name in os.listdir(root / "boot"):
        if name.startswith("System.map-"):
            (root / "boot" / name).unlink()
    progress("rebuilding the initramfs")
    chroot(root, ["update-initramfs", "-u", "-k", kver], env={"SOURCE_DATE_EPOCH": str(epoch)})
    # The boot contract: GRUB loads these two paths from the slot (relative links).
    _link(root, "boot/vmlinuz", f"vmlinuz-{kver}")
    _link(root, "boot/initrd.img", f"initrd.img-{kver}")
    for rel in DROP:
        path = root / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    (root / "var/log").mkdir(mode=0o755)


def node_files(root: Path, root_json: bytes, vmm: Path | None, firmware: Path | None) -> None:
    """The node's contracts: trust root, ota.conf, health.d, data-partition links, sshd,
    network, the VMM, the OpenRC services."""
    _write(root, "usr/lib/spk-visor/root.json", root_json.decode(), 0o444)
    _write(root, "usr/share/spk-visor/ota.conf", nodefiles.OTA_CONF)
    for rel, text in nodefiles.HEALTH_CHECKS.items():
        _write(root, f"etc/spk-visor/health.d/{rel}", text, 0o755)
    for rel, target in nodefiles.NODE_LINKS.items():
        _link(root, rel, target)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # every node makes its own, on /data, at first boot
    _write(root, "etc/ssh/sshd_config.d/smechvisor.conf", nodefiles.SSHD_CONFIG)
    _write(root, "etc/fstab", nodefiles.FSTAB)
    _write(root, "etc/network/interfaces", nodefiles.NETWORK_INTERFACES)
    _write(root, "etc/dhcp/dhclient-enter-hooks.d/spk-visor", nodefiles.DHCLIENT_HOOK)
    _write(root, nodefiles.CRON_PATH, nodefiles.CRON_OTA)
    _link(root, nodefiles.DAEMON_COMMAND, nodefiles.DAEMON_COMMAND_TARGET)
    for rel in ("data", "var/lib/dhcp"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    if vmm is not None:
        shutil.copyfile(vmm, root / "usr/bin/cloud-hypervisor")
        (root / "usr/bin/cloud-hypervisor").chmod(0o755)
    if firmware is not None:
        dest = root / "usr/share/cloud-hypervisor/CLOUDHV.fd"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(firmware, dest)
        dest.chmod(0o644)


def services(root: Path) -> None:
    """The packaged OpenRC scripts, and the runlevels: data first, then the product."""
    scripts = Path(smechvisord.__file__).parent / "openrc"
    for name in SERVICES_DEFAULT:
        _write(root, f"etc/init.d/{name}", (scripts / name).read_text(), 0o755)
        _write(root, f"etc/conf.d/{name}", (scripts / f"{name}.confd").read_text())
    _write(root, "etc/init.d/spk-visor-data", nodefiles.DATA_SERVICE, 0o755)
    chroot(root, ["rc-update", "add", "spk-visor-data", "sysinit"])
    for name in (*SERVICES_DEFAULT, "ssh", "cron"):
        # cron's postinst adds itself when openrc was unpacked first; not otherwise.
        if not (root / "etc/runlevels/default" / name).is_symlink():
            chroot(root, ["rc-update", "add", name, "default"])


def recompile_python(root: Path, epoch: int) -> None:
    """Debian compiled the stdlib at install time with a random hash seed (set constants
    come out in any order): compile it again, deterministically."""
    for base in ("usr/lib/python3.11", "usr/lib/python3/dist-packages"):
        for cache in sorted((root / base).rglob("__pycache__")):
            shutil.rmtree(cache)
    env = {"SOURCE_DATE_EPOCH": str(epoch), "PYTHONHASHSEED": "0"}
    # One process: the chroot has no /dev/shm for a worker pool.
    argv = ["/usr/bin/python3", "-m", "compileall", "-q"]
    argv += ["--invalidation-mode", "checked-hash", "/usr/lib/python3.11"]
    argv += ["/usr/lib/python3/dist-packages"]
    # compileall exits 1 for modules it cannot compile (Python 2 leftovers in tests);
    # those were dropped above, so any failure is real.
    chroot(root, argv, env)


def package_list(root: Path) -> str:
    """`name version` of every installed package, for /usr/share/smechvisor/packages."""
    return chroot(root, ["dpkg-query", "-W", "-f", "${Package} ${Version}\n"])


def seal(root: Path, packages: str) -> list[str]:
    """No package manager left working: apt, dpkg and pip become refusing stubs, and the
    package databases go. Returns the commands replaced."""
    _write(root, "usr/share/smechvisor/packages", packages)
    replaced = []
    for name in nodefiles.SEALED_COMMANDS:
        for bindir in ("usr/bin", "usr/sbin"):
            path = root / bindir / name
            if path.is_symlink() or path.exists() or name in ALWAYS_SEALED:
                _write(root, f"{bindir}/{name}", nodefiles.SEALED_STUB, 0o755)
                replaced.append(f"/{bindir}/{name}")
                break
    for rel in SEALED_CRON_JOBS:
        (root / rel).unlink(missing_ok=True)
    for rel in ("var/lib/dpkg", "etc/apt", "etc/dpkg", "usr/lib/apt", "usr/lib/dpkg"):
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    return replaced


def compilers(root: Path) -> list[str]:
    """Compilers and assemblers present in the image (there should be none)."""
    found = []
    for bindir in ("usr/bin", "usr/sbin", "usr/local/bin"):
        directory = root / bindir
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            name = path.name
            if name in COMPILERS or name.startswith(("gcc-", "g++-", "x86_64-linux-gnu-")):
                found.append(f"/{bindir}/{name}")
    return sorted(found)
