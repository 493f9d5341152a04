"""Build the Deploy Shim ISO (design/deploy.md, "Building the Deploy Shim ISO").

The ISO boots on BIOS and UEFI (grub-mkrescue: El Torito for both plus a hybrid MBR/GPT,
so `dd` to a USB stick works too). It holds a Debian kernel and an initramfs with static
busybox, Debian's own python3.11 with its libraries, our packages and their wheels,
the disk tools the installer runs, kernel modules for disks and NICs, the trust root,
and `shim/init`, which brings the machine up and starts `spk-visor deploy receive`.

Every dynamically linked file is followed by `ldd` and its libraries are copied at the
same absolute paths, like initramfs-tools' copy_exec.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import zstandard

from smechvisord.version import VERSION
from spk_visor import new_folder
from spk_visor.errors import ConfigError, SpkVisorError, UsageError
from spk_visor.install import runner
from spk_visor.ota import roots as ota_roots
from spk_visor.ota.nodeconf import SYSROOT_ENV, NodePaths

Progress = Callable[[str], None]

VOLID = "SPK_SHIM"
TRUST_ROOT_IN_SHIM = "usr/lib/spk-visor/root.json"
SHIM_PYTHON = "/usr/bin/python3.11"  # Debian's; a pyenv/venv interpreter is not relocatable
PY_TARGET = "usr/lib/spk"  # our packages and wheels (PYTHONPATH in /init)
GRUB_TIMEOUT = 3
KERNEL_META = "linux-image-amd64"

_SRC_ROOT = Path(__file__).resolve().parents[2]
SHIM_DIR = _SRC_ROOT / "shim"

# Stdlib parts the shim never uses (design: step 4).
_STDLIB_DROP = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "distutils",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "turtle.py",
    }
)
_DYNLOAD_DROP = re.compile(r"^(_test|_ctypes_test|_xxtestfuzz|xxlimited|xxsubtype|_tkinter)")

# The installer's tools (contract "disk"): without one of these the shim cannot deploy.
_DISK_TOOLS = (
    ("sfdisk", "fdisk"),
    ("wipefs", "util-linux"),
    ("blkid", "util-linux"),
    ("lsblk", "util-linux"),
    ("partx", "util-linux"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("mmd", "mtools"),
    ("mdel", "mtools"),  # abort removes a BOOTX64.EFI it wrote
    ("mformat", "mtools"),
    ("mdir", "mtools"),
    ("grub-install", "grub2-common"),
    ("grub-mkimage", "grub-common"),
    ("grub-probe", "grub-common"),
    ("grub-editenv", "grub-common"),
    ("udevadm", "udev"),
    ("kmod", "kmod"),
)
# Useful but not required; a missing one is reported in IsoResult.warnings.
_OPTIONAL_TOOLS = (
    ("efibootmgr", "efibootmgr"),
    ("e2fsck", "e2fsprogs"),
    ("tune2fs", "e2fsprogs"),
    ("findmnt", "util-linux"),
    ("blockdev", "util-linux"),
    ("mount", "mount"),
    ("umount", "mount"),
)
_BUILD_TOOLS = (
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("gzip", "gzip"),
    ("ldd", "libc-bin"),
    ("depmod", "kmod"),
    ("dpkg-deb", "dpkg"),
    ("grub-mkrescue", "grub-common"),
    ("xorriso", "xorriso"),
    ("mformat", "mtools"),
)
_GRUB_PLATFORMS = ("i386-pc", "x86_64-efi")
_UDEV_HELPERS = ("ata_id", "scsi_id", "cdrom_id")

# Kernel modules (design: step 8). Directories are taken whole, names with their deps.
_MODULE_DIRS = (
    "kernel/drivers/ata/",
    "kernel/drivers/nvme/",
    "kernel/drivers/block/",
    "kernel/drivers/virtio/",
    "kernel/drivers/cdrom/",
    "kernel/drivers/scsi/megaraid/",
    "kernel/drivers/scsi/mpt3sas/",
    "kernel/drivers/scsi/smartpqi/",
    "kernel/drivers/scsi/mpi3mr/",
    "kernel/drivers/scsi/aacraid/",
    "kernel/drivers/usb/host/",
    "kernel/drivers/usb/storage/",
    "kernel/drivers/hid/usbhid/",
    "kernel/drivers/net/ethernet/intel/",
    "kernel/drivers/net/ethernet/realtek/",
    "kernel/drivers/net/ethernet/broadcom/",
    "kernel/drivers/net/ethernet/mellanox/",
    "kernel/drivers/net/ethernet/aquantia/",
    "kernel/drivers/net/ethernet/amazon/",
    "kernel/drivers/net/hyperv/",
    "kernel/fs/ext4/",
    "kernel/fs/fat/",
    "kernel/fs/nls/",
    "kernel/fs/efivarfs/",
    "kernel/fs/isofs/",
)
_MODULE_NAMES = (
    "sd_mod",
    "sr_mod",
    "sg",
    "scsi_mod",
    "virtio_scsi",
    "hpsa",
    "vmw_pvscsi",
    "hv_storvsc",
    "isci",
    "virtio_net",
    "vmxnet3",
    "hid_generic",
    "crc32c_generic",
    "crc32c_intel",
    "libcrc32c",
    "loop",
    "efivarfs",
)
# Probing a floppy controller that has no drive stalls boot and spams I/O errors
# (QEMU has one); no server needs it.
_MODULE_SKIP = frozenset({"floppy"})
_KO = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


class ShimBuildError(SpkVisorError):
    """A build step failed (the tool's own message is in the text)."""


@dataclass(frozen=True)
class IsoResult:
    path: Path
    size: int  # bytes of the ISO
    initrd_size: int  # bytes of the compressed initramfs
    kernel_version: str
    seconds: float  # wall time of build_iso
    compression: str  # "zstd" or "gzip"
    warnings: tuple[str, ...] = ()


# The longest one build step may take.
BUILD_STEP_TIMEOUT_S = 1800
# ldd loads nothing, it only resolves: seconds even for python3 with all its libraries.
LDD_TIMEOUT_S = 60


def _say(progress: Progress | None, text: str) -> None:
    if progress is not None:
        progress(text)


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    # Generous: grub-mkrescue and a cold `apt-get download` can take minutes, but a hung
    # tool must not hang the build forever.
    return runner.run_checked(argv, ShimBuildError, timeout=BUILD_STEP_TIMEOUT_S, cwd=cwd)


def cache_dir() -> Path:
    """Where downloads (the kernel .deb) are kept between builds; never in the repo."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "spk-visor"
    if os.geteuid() == 0:
        return Path("/var/cache/spk-visor")
    return Path.home() / ".cache" / "spk-visor"


# --- kernel -------------------------------------------------------------------------


def _kernel_package() -> str:
    """The versioned Debian kernel package the amd64 metapackage points at."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    # No metapackage in the sources: the newest generic versioned image.
    pattern = re.compile(r"^linux-image-(\d+)\.(\d+)\.(\d+)-(\d+)-amd64$")
    names: list[tuple[tuple[int, ...], str]] = []
    for line in _run(["apt-cache", "search", "--names-only", "linux-image-6"]).splitlines():
        name = line.split(" ", 1)[0]
        m = pattern.match(name)
        if m:
            names.append((tuple(int(g) for g in m.groups()), name))
    if not names:
        raise ConfigError(
            "no Debian kernel package found (apt-cache search linux-image-6)",
            hint="pass --kernel with a linux-image .deb or an unpacked kernel tree",
        )
    return max(names)[1]


def find_kernel(cache: Path | None = None, progress: Progress | None = None) -> Path:
    """The Debian kernel .deb, downloaded once with `apt-get download` into the cache."""
    kdir = (cache or cache_dir()) / "kernel"
    kdir.mkdir(parents=True, exist_ok=True)
    try:
        package = _kernel_package()
    except (ShimBuildError, FileNotFoundError):
        # apt not usable (offline, no lists): any kernel downloaded before will do.
        cached = sorted(kdir.glob("linux-image-*.deb"))
        if cached:
            return cached[-1]
        raise
    cached = sorted(kdir.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    _say(progress, f"downloading {package}")
    # Into a private directory first: two builds at once must not see half a .deb.
    with tempfile.TemporaryDirectory(dir=kdir, prefix=".download-") as tmp:
        _run(["apt-get", "download", "-q", package], cwd=Path(tmp))
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise ShimBuildError(f"apt-get download {package} left no .deb")
        os.replace(debs[-1], kdir / debs[-1].name)
    return kdir / debs[-1].name


@dataclass(frozen=True)
class _Kernel:
    vmlinuz: Path
    version: str
    modules: Path | None  # <root>/lib/modules/<version>, None for a bare image
    config: str  # the kernel's config file text ("" when unknown)


def _unpack_kernel(src: Path, work: Path) -> _Kernel:
    """A kernel from a .deb, an unpacked tree (boot/ + lib/modules/), or a bare image."""
    if src.is_file() and src.suffix == ".deb":
        root = work / "kernel"
        root.mkdir()
        _run(["dpkg-deb", "-x", str(src), str(root)])
    elif src.is_dir():
        root = src
    elif src.is_file():
        return _Kernel(vmlinuz=src, version="unknown", modules=None, config="")
    else:
        raise ConfigError(f"kernel not found: {src}")
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        raise ConfigError(f"no boot/vmlinuz-* in {src}")
    version = images[-1].name.removeprefix("vmlinuz-")
    moddir = root / "lib" / "modules" / version
    if not moddir.is_dir():
        moddir = root / "usr" / "lib" / "modules" / version
    config_file = root / "boot" / f"config-{version}"
    return _Kernel(
        vmlinuz=images[-1],
        version=version,
        modules=moddir if moddir.is_dir() else None,
        config=config_file.read_text() if config_file.is_file() else "",
    )


# --- the staging root ---------------------------------------------------------------


@dataclass
class _Stage:
    root: Path
    warnings: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def layout(self) -> None:
        # Debian's merged /usr: /lib and /lib64 are links, so ldd's paths land in usr/.
        for d in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "etc", "root"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "mnt/target"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "lib").symlink_to("usr/lib")
        (self.root / "lib64").symlink_to("usr/lib64")
        (self.root / "etc/mtab").symlink_to("/proc/self/mounts")
        (self.root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (self.root / "etc/group").write_text("root:x:0:\ndisk:x:6:\ntty:x:5:\n")
        (self.root / "etc/hostname").write_text("spk-shim\n")

    def dest(self, path: str | Path) -> Path:
        return self.root / str(path).lstrip("/")

    def add_file(self, src: Path, dest: str | Path | None = None, mode: int | None = None) -> Path:
        """Copy src's content (following links) to dest (default: the same absolute path)."""
        target = self.dest(dest if dest is not None else src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copy2(src, target)
        if mode is not None:
            target.chmod(mode)
        return target

    def add_libs(self, path: Path) -> None:
        """Every library ldd lists for path, at the same absolute path."""
        try:
            listing = runner.run_checked(["ldd", str(path)], ShimBuildError, timeout=LDD_TIMEOUT_S)
        except ShimBuildError as e:
            if "timed out" in str(e):
                raise
            return  # static, or not an ELF object: ldd exits 1
        for raw_line in listing.splitlines():
            line = raw_line.strip()
            if "=>" in line:
                name, _, rest = line.partition("=>")
                lib = rest.strip().split(" ", 1)[0]
                if lib == "not":
                    self.warnings.append(f"{path.name}: {name.strip()} not found by ldd")
                    continue
            else:
                lib = line.split(" ", 1)[0]
            if not lib.startswith("/") or lib in self._seen:
                continue
            if Path(lib).resolve().is_relative_to(self.root.resolve()):
                continue  # the wheel's own .libs (rpath $ORIGIN)
            self._seen.add(lib)
            self.add_file(Path(lib))

    def add_binary(self, src: Path, dest: str | Path | None = None) -> Path:
        target = self.add_file(src, dest)
        self.add_libs(src)
        return target

    def link(self, path: str, to: str) -> None:
        target = self.dest(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(to)

    def libs_of_tree(self, tree: Path) -> None:
        for so in sorted(tree.rglob("*.so*")):
            if so.is_file() and not so.is_symlink():
                self.add_libs(so)


def _which(name: str) -> Path | None:
    found = shutil.which(name)
    return Path(found) if found else None


def _check_build_tools() -> None:
    missing = [f"{tool} ({pkg})" for tool, pkg in _BUILD_TOOLS if _which(tool) is None]
    if not Path(SHIM_PYTHON).is_file():
        missing.append(f"{SHIM_PYTHON} (python3.11-minimal)")
    missing += [f"{tool} ({pkg})" for tool, pkg in _DISK_TOOLS if _which(tool) is None]
    missing += [f"/usr/lib/grub/{p} (grub-pc-bin / grub-efi-amd64-bin)" for p in _GRUB_PLATFORMS
                if not Path("/usr/lib/grub", p).is_dir()]  # fmt: skip
    if missing:
        raise ConfigError(
            "cannot build the shim ISO, missing: " + ", ".join(missing),
            hint="install the Debian packages named in brackets (scripts/install-sysdeps)",
        )


def _add_busybox(stage: _Stage) -> None:
    busybox = _which("busybox")
    if busybox is None:
        raise ConfigError("busybox not found (Debian package busybox-static)")
    stage.add_file(busybox, "bin/busybox", 0o755)
    applets = _run([str(busybox), "--list"]).split()
    for applet in applets:
        if applet != "busybox":
            # All applets in /bin: the real tools live in /usr/{s,}bin, first in PATH.
            stage.link(f"bin/{applet}", "busybox")


def _add_tools(stage: _Stage) -> None:
    for tool, pkg in _DISK_TOOLS + _OPTIONAL_TOOLS:
        path = _which(tool)
        if path is None:
            stage.warnings.append(f"{tool} not on the build host (Debian package {pkg}); left out")
            continue
        dest = Path("/usr/sbin" if "sbin" in path.parent.name else "/usr/bin") / tool
        stage.add_binary(path, dest)
    # kmod's modprobe (not busybox's): reads modules.alias/softdep exactly like udev does.
    for name in ("modprobe", "insmod", "rmmod", "lsmod", "modinfo", "depmod"):
        stage.link(f"usr/sbin/{name}", "../bin/kmod")
    # The kernel's own module requests (request_module: the crc32c that ext4 needs at
    # mount time, crypto, nls) run /sbin/modprobe, its built-in path, not $PATH's.
    stage.link("sbin/modprobe", "../usr/bin/kmod")
    _add_mtools_codepage(stage)
    for platform in _GRUB_PLATFORMS:
        shutil.copytree(Path("/usr/lib/grub", platform), stage.dest(f"usr/lib/grub/{platform}"))
    # udevd is udevadm under another name; its rules and helpers make the udev database
    # (serials, WWNs) that lsblk and grub-install read.
    stage.link("usr/lib/systemd/systemd-udevd", "../../bin/udevadm")
    udev = Path("/usr/lib/udev")
    if (udev / "rules.d").is_dir():
        shutil.copytree(udev / "rules.d", stage.dest("usr/lib/udev/rules.d"), symlinks=True)
    for helper in _UDEV_HELPERS:
        if (udev / helper).is_file():
            stage.add_binary(udev / helper)


# mtools converts FAT short names with iconv to and from its codepage (850): without that
# glibc converter, mmd and mcopy refuse to touch the ESP ("Error setting code page").
GCONV_DIR = Path("/usr/lib/x86_64-linux-gnu/gconv")
_GCONV_MODULES = """\
alias\tCP850//\tIBM850//
alias\t850//\tIBM850//
module\tIBM850//\tINTERNAL\tIBM850\t1
module\tINTERNAL\tIBM850//\tIBM850\t1
"""


def _add_mtools_codepage(stage: _Stage) -> None:
    converter = GCONV_DIR / "IBM850.so"
    if not converter.is_file():
        stage.warnings.append(f"{converter} missing: mtools cannot write the ESP")
        return
    stage.add_binary(converter)
    # Only the one converter, so a config naming only it (glibc reads it without a cache).
    (stage.dest(GCONV_DIR) / "gconv-modules").write_text(_GCONV_MODULES)


def _stdlib_ignore(directory: str, names: list[str]) -> set[str]:
    drop = {n for n in names if n in _STDLIB_DROP or n.startswith("config-")}
    if os.path.basename(directory) == "lib-dynload":
        drop |= {n for n in names if _DYNLOAD_DROP.match(n)}
    return drop


def _add_python(stage: _Stage) -> str:
    python = Path(SHIM_PYTHON)
    stage.add_binary(python)
    stage.link("usr/bin/python3", python.name)
    # glibc dlopen()s libgcc_s for thread cancellation; cryptography's Rust code needs
    # it too. ldd cannot see the first (Debian bug #950254), so always add it.
    libc_dir = next(
        (Path(p).parent for p in stage._seen if Path(p).name.startswith("libc.so")), None
    )
    gcc_s = libc_dir / "libgcc_s.so.1" if libc_dir else None
    if gcc_s is None or not gcc_s.is_file():
        raise ShimBuildError("libgcc_s.so.1 not found next to libc (Debian package libgcc-s1)")
    stage._seen.add(str(gcc_s))
    stage.add_file(gcc_s)
    out = _run(
        [
            str(python),
            "-c",
            "import sysconfig, platform; print(sysconfig.get_path('stdlib')); "
            "print(sysconfig.get_config_var('DESTSHARED')); print(platform.python_version())",
        ]
    ).split()
    stdlib, dynload, version = Path(out[0]), Path(out[1]), out[2]
    shutil.copytree(
        stdlib,
        stage.dest(stdlib),
        symlinks=False,
        ignore=_stdlib_ignore,
        ignore_dangling_symlinks=True,
    )
    if not stage.dest(dynload).is_dir():
        shutil.copytree(dynload, stage.dest(dynload), ignore=_stdlib_ignore)
    stage.libs_of_tree(stage.dest(dynload))
    return version


def _project_dependencies() -> list[str]:
    """The runtime requirements of spk-visor (pyproject when built from a checkout)."""
    pyproject = _SRC_ROOT / "pyproject.toml"
    if pyproject.is_file():
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        return [str(d) for d in deps]
    reqs = importlib.metadata.requires("spk-visor") or []
    return [r for r in reqs if "extra ==" not in r]


def _pip_platforms() -> Iterator[str]:
    # glibc of Debian 12 is 2.36; any manylinux wheel up to that runs in the shim.
    yield from (f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1))
    yield from ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")


def _add_packages(stage: _Stage, progress: Progress | None) -> None:
    target = stage.dest(PY_TARGET)
    target.mkdir(parents=True)
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile"]
    argv += ["--target", str(target), "--only-binary=:all:"]
    argv += ["--implementation", "cp", "--python-version", "3.11"]
    argv += ["--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    for platform in _pip_platforms():
        argv += ["--platform", platform]
    argv += _project_dependencies()
    _say(progress, "installing wheels (pip install --target, cp311)")
    _run(argv)
    for package in ("spk_visor", "smechvisord"):
        src = _SRC_ROOT / package
        if not src.is_dir():
            raise ShimBuildError(f"package source {src} not found")
        shutil.copytree(
            src, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    stage.libs_of_tree(target)
    _strip_extensions(stage, target)
    # Byte-compile with the shim's own interpreter (the magic number must match); the
    # cpio keeps mtimes, so the timestamp-checked .pyc files stay valid at boot.
    _run([SHIM_PYTHON, "-m", "compileall", "-q", "-j", "0", str(target)])


def _strip_extensions(stage: _Stage, target: Path) -> None:
    """Drop the symbol tables of the wheels' extension modules (zstandard: 12 MB -> 1 MB).

    The bundled libraries in *.libs directories are left alone: auditwheel rewrote
    their headers with patchelf, and strip has been known to break such files.
    """
    strip = _which("strip")
    if strip is None:
        stage.warnings.append("strip not found (Debian package binutils): wheels not stripped")
        return
    files = [
        str(so)
        for so in sorted(target.rglob("*.so"))
        if so.is_file() and not so.is_symlink() and not so.parent.name.endswith(".libs")
    ]
    if files:
        _run([str(strip), "--strip-unneeded", *files])


def _module_name(path: str) -> str:
    return _KO.sub("", Path(path).name).replace("-", "_")


def _add_modules(stage: _Stage, kernel: _Kernel, work: Path) -> int:
    """Copy the wanted modules with their dependencies; run depmod on the result."""
    if kernel.modules is None:
        stage.warnings.append("bare kernel image: no modules (drivers must be built in)")
        return 0
    moddir = kernel.modules
    meta_dir = moddir
    if not (moddir / "modules.dep").is_file():
        # The .deb ships no modules.dep: compute it in a scratch tree under work
        # (hard links, cheap), so a kernel tree given with --kernel is never modified.
        base = work / "depmod"
        meta_dir = base / "lib" / "modules" / kernel.version
        meta_dir.parent.mkdir(parents=True)
        try:
            shutil.copytree(moddir, meta_dir, symlinks=True, copy_function=os.link)
        except (OSError, shutil.Error):
            shutil.rmtree(meta_dir, ignore_errors=True)
            shutil.copytree(moddir, meta_dir, symlinks=True)
        _run(["depmod", "-b", str(base), kernel.version])
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (meta_dir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[_module_name(mod)] = mod
    softdeps: dict[str, list[str]] = {}
    softdep_file = meta_dir / "modules.softdep"
    if softdep_file.is_file():
        for line in softdep_file.read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[0] == "softdep":
                softdeps[parts[1].replace("-", "_")] = [p for p in parts[2:] if not p.endswith(":")]
    wanted = [m for m in deps if m.startswith(_MODULE_DIRS)]
    wanted += [by_name[n] for n in _MODULE_NAMES if n in by_name]
    chosen: set[str] = set()
    while wanted:
        mod = wanted.pop()
        if mod in chosen or _module_name(mod) in _MODULE_SKIP:
            continue
        chosen.add(mod)
        wanted += deps.get(mod, [])
        wanted += [by_name[s] for s in softdeps.get(_module_name(mod), []) if s in by_name]
    dest = Path("lib/modules", kernel.version)
    for mod in sorted(chosen):
        stage.add_file(moddir / mod, dest / mod)
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (moddir / meta).is_file():
            stage.add_file(moddir / meta, dest / meta)
    _run(["depmod", "-b", str(stage.root), kernel.version])
    return len(chosen)


def _add_shim_files(stage: _Stage, trust_root: bytes) -> None:
    init = (SHIM_DIR / "init").read_text().replace("@SHIM_VERSION@", VERSION)
    (stage.root / "init").write_text(init)
    (stage.root / "init").chmod(0o755)
    stage.add_file(SHIM_DIR / "udhcpc.script", "usr/lib/spk-visor/udhcpc.script", 0o755)
    stage.add_file(SHIM_DIR / "shim_check.py", "usr/lib/spk-visor/shim_check.py", 0o644)
    root_json = stage.dest(TRUST_ROOT_IN_SHIM)
    root_json.parent.mkdir(parents=True, exist_ok=True)
    root_json.write_bytes(trust_root)
    root_json.chmod(0o644)
    (stage.root / "etc/spk-shim-version").write_text(f"{VERSION}\n")


def _walk(root: Path) -> Iterable[str]:
    """Every path under root, parents first (cpio creates them in this order)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            yield rel
        # Links to directories are entries of their own; os.walk does not enter them.
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(filenames + links):
            yield os.path.normpath(os.path.join(rel, name))


def _pack(stage: Path, out: Path, compression: str) -> None:
    """newc cpio, owners 0:0 (-R), then zstd or gzip."""
    # The list goes in through a file: cpio writes its output while still reading.
    listing = out.with_name(out.name + ".list")
    listing.write_text("\n".join(_walk(stage)) + "\n")
    with listing.open("rb") as names, out.open("wb") as sink:
        if compression != "zstd":
            runner.pipeline(
                ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                ["gzip", "-6", "-n"],
                ShimBuildError,
                timeout=BUILD_STEP_TIMEOUT_S,
                stdin=names,
                stdout=sink,
                cwd=stage,
            )
        else:
            _pack_zstd(stage, names, sink)
    listing.unlink()


def _pack_zstd(stage: Path, names: IO[bytes], sink: IO[bytes]) -> None:
    """cpio into zstd in this process; cpio is killed if it outlives the build step."""
    cpio = subprocess.Popen(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        cwd=stage,
        stdin=names,
        stdout=subprocess.PIPE,
    )
    try:
        if cpio.stdout is None:
            raise ShimBuildError("cpio: no output pipe")
        # No long-distance window: the kernel's decompressor must stream it.
        cctx = zstandard.ZstdCompressor(level=12, threads=-1)
        with cctx.stream_writer(sink, closefd=False) as writer:
            while chunk := cpio.stdout.read(1 << 20):
                writer.write(chunk)
        cpio.stdout.close()
        rc = cpio.wait(timeout=BUILD_STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ShimBuildError("cpio: timed out") from e
    finally:
        if cpio.poll() is None:
            cpio.kill()
            cpio.wait()
    if rc != 0:
        raise ShimBuildError(f"cpio failed ({rc})")


def _compression(kernel: _Kernel) -> str:
    # zstd unpacks several times faster than gzip at boot (measured under TCG).
    return "zstd" if "CONFIG_RD_ZSTD=y" in kernel.config else "gzip"


def _load_trust_root(path: Path | None, option: str = "--trust-root") -> bytes:
    """The anchor to bake in, refused now if corrupt rather than on a blank machine in a
    data centre. `option` is the command's name for it (image build: --root)."""
    if path is None:
        path = NodePaths(Path(os.environ.get(SYSROOT_ENV, "/"))).factory_root
    _root, raw = ota_roots.load_file(
        path, hint=f"pass {option} with the product's root.json (OTA root of trust)"
    )
    return raw


def grub_cfg() -> str:
    text = (SHIM_DIR / "grub.cfg").read_text()
    return text.replace("@SHIM_VERSION@", VERSION).replace("@TIMEOUT@", str(GRUB_TIMEOUT))


def build_initramfs(
    out: Path,
    kernel: _Kernel,
    trust_root: bytes,
    work: Path,
    progress: Progress | None = None,
) -> tuple[str, list[str]]:
    """Stage and pack the initramfs; returns (compression, warnings)."""
    stage = _Stage(work / "stage")
    stage.layout()
    _say(progress, "initramfs: busybox, python3.11 and the stdlib")
    _add_busybox(stage)
    _add_python(stage)
    _add_packages(stage, progress)
    _say(progress, "initramfs: disk tools, grub modules, udev")
    _add_tools(stage)
    _say(progress, f"initramfs: kernel modules for {kernel.version}")
    count = _add_modules(stage, kernel, work)
    _say(progress, f"initramfs: {count} modules")
    _add_shim_files(stage, trust_root)
    compression = _compression(kernel)
    _say(progress, f"initramfs: packing (newc cpio, {compression})")
    _pack(stage.root, out, compression)
    return compression, stage.warnings


def build_iso(
    out: Path,
    *,
    kernel: Path | None,
    trust_root: Path | None,
    progress: Progress | None = None,
) -> IsoResult:
    """Build the hybrid BIOS+UEFI Deploy Shim ISO at out (written atomically).

    kernel: a linux-image .deb, an unpacked kernel tree (boot/vmlinuz-V and
    lib/modules/V), or a bare image (then no modules); None: find_kernel().
    trust_root: the OTA root.json baked in at /usr/lib/spk-visor/root.json (it must
    verify under its own root role); None: this machine's factory root.
    progress: called with one short line per build step.
    """
    start = time.monotonic()
    # What the operator typed first, before anything is said or made.
    if out.is_dir():
        raise UsageError(
            f"--out {out} is a folder; the ISO is one file",
            f"give the ISO's file name, e.g. --out {out / 'spk-shim.iso'}",
        )
    new_folder.check(out.parent, f"--out {out}")
    root_raw = _load_trust_root(trust_root)
    if kernel is not None and not kernel.exists():
        raise ConfigError(
            f"kernel not found: {kernel}",
            "give --kernel a linux-image .deb, an unpacked kernel tree or a kernel image, "
            "or leave it out to use this machine's",
        )
    _check_build_tools()
    kernel_src = kernel if kernel is not None else find_kernel(progress=progress)
    out = out.resolve()
    new_folder.make(out.parent, f"--out {out}")
    with tempfile.TemporaryDirectory(prefix="spk-shim-") as tmp:
        work = Path(tmp)
        _say(progress, f"kernel: {kernel_src}")
        k = _unpack_kernel(kernel_src, work)
        tree = work / "iso"
        (tree / "boot/grub").mkdir(parents=True)
        shutil.copy2(k.vmlinuz, tree / "boot/vmlinuz")
        initrd = tree / "boot/initrd.img"
        compression, warnings = build_initramfs(initrd, k, root_raw, work, progress)
        (tree / "boot/grub/grub.cfg").write_text(grub_cfg())
        _say(progress, "iso: grub-mkrescue")
        partial = out.with_name(f".{out.name}.partial")
        try:
            _run(["grub-mkrescue", "-o", str(partial), str(tree), "--", "-volid", VOLID])
            partial.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
        initrd_size = initrd.stat().st_size
    return IsoResult(
        path=out,
        size=out.stat().st_size,
        initrd_size=initrd_size,
        kernel_version=k.version,
        seconds=time.monotonic() - start,
        compression=compression,
        warnings=tuple(warnings),
    )
