"""The Deploy Shim ISO: built once per module, inspected, then booted in QEMU twice.

Boots: SeaBIOS from the El Torito BIOS image, then OVMF (UEFI) from the EFI image. Both
must reach the line /init prints after Python imported spk_visor and cryptography's Rust
extension ran in the initramfs ("SPK-SHIM ready ..."). The receiver's own nameplate line
comes after it and is not required here (the receiver is tested on its own).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from spk_visor.deploy import shim_iso
from spk_visor.errors import VerificationError
from tests.support.ota_pki import Pki
from tests.support.prereq import need_command, need_root
from tests.support.shim_qemu import OVMF_CODE, OVMF_VARS, READY, boot_iso

pytestmark = pytest.mark.root


@dataclass
class Built:
    iso: Path
    result: shim_iso.IsoResult
    root_json: bytes
    work: Path


def _prereqs() -> None:
    need_root()
    for cmd, pkg in [
        ("grub-mkrescue", "grub-common"),
        ("grub-install", "grub2-common"),
        ("xorriso", "xorriso"),
        ("mformat", "mtools"),
        ("mkfs.vfat", "dosfstools"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("depmod", "kmod"),
        ("udevadm", "udev"),
        ("python3.11", "python3.11-minimal"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ]:
        need_command(cmd, pkg)
    for path, pkg in [
        (Path("/usr/lib/grub/i386-pc"), "grub-pc-bin"),
        (Path("/usr/lib/grub/x86_64-efi"), "grub-efi-amd64-bin"),
        (OVMF_CODE, "ovmf"),
        (OVMF_VARS, "ovmf"),
    ]:
        if not path.exists():
            pytest.skip(f"{path} missing: install the Debian package {pkg} (make sysdeps)")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    _prereqs()
    work = tmp_path_factory.mktemp("shim")
    root_json = Pki().root_env().to_bytes()
    trust = work / "root.json"
    trust.write_bytes(root_json)
    steps: list[str] = []
    # The kernel .deb comes from apt once and stays in the user cache (never the repo).
    result = shim_iso.build_iso(
        work / "spk-shim.iso", kernel=None, trust_root=trust, progress=steps.append
    )
    assert steps, "build_iso reported no progress"
    yield Built(work / "spk-shim.iso", result, root_json, work)


def _extract(iso: Path, inner: str, dest: Path) -> Path:
    subprocess.run(
        ["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", inner, str(dest)],
        check=True,
        capture_output=True,
    )
    return dest


def _initramfs(built: Built) -> bytes:
    raw = _extract(built.iso, "/boot/initrd.img", built.work / "initrd.img").read_bytes()
    if raw[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(raw).read()
    return gzip.decompress(raw)


def _cpio(archive: bytes, *args: str) -> bytes:
    return subprocess.run(
        ["cpio", "--quiet", *args], input=archive, capture_output=True, check=True
    ).stdout


def test_iso_has_bios_and_uefi_boot_images(built: Built) -> None:
    report = subprocess.run(
        ["xorriso", "-indev", str(built.iso), "-report_el_torito", "plain"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # the volume id is an info message on stderr
        text=True,
        check=True,
    ).stdout
    images = re.findall(r"El Torito boot img :\s+\d+\s+(\w+)\s+y", report)
    assert sorted(images) == ["BIOS", "UEFI"], report
    assert "Volume id    : 'SPK_SHIM'" in report
    assert "GPT" in report  # hybrid system area: dd to a USB stick boots too
    assert built.result.size == built.iso.stat().st_size
    assert built.result.kernel_version.endswith("-amd64")


def test_initramfs_has_runtime_tools_modules_and_trust_root(built: Built) -> None:
    archive = _initramfs(built)
    names = set(_cpio(archive, "-t").decode().split("\n"))
    for path in [
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/udhcpc",
        "usr/bin/python3.11",
        "usr/lib64/ld-linux-x86-64.so.2",
        "usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
        "usr/lib/x86_64-linux-gnu/libssl.so.3",
        "usr/lib/python3.11/os.py",
        "usr/lib/spk/spk_visor/__init__.py",
        "usr/lib/spk/smechvisord/version.py",
        "usr/sbin/sfdisk",
        "usr/sbin/wipefs",
        "usr/bin/lsblk",
        "usr/sbin/mkfs.ext4",
        "usr/sbin/mkfs.vfat",
        "usr/bin/mcopy",
        "usr/sbin/grub-install",
        "usr/bin/grub-mkimage",
        "usr/bin/udevadm",
        "usr/lib/grub/i386-pc/boot.img",
        "usr/lib/grub/x86_64-efi/normal.mod",
        shim_iso.TRUST_ROOT_IN_SHIM,
    ]:
        assert path in names, f"{path} missing from the initramfs"
    assert any(n.startswith("usr/lib/spk/cryptography/hazmat/bindings/_rust") for n in names)
    assert not any(n.startswith("usr/lib/python3.11/test/") for n in names)
    assert not any(n.startswith("usr/lib/python3.11/tkinter/") for n in names)

    version = built.result.kernel_version
    moddep = _cpio(archive, "-i", "--to-stdout", f"usr/lib/modules/{version}/modules.dep")
    for name in ("e1000", "e1000e", "virtio_net", "nvme", "ahci", "ext4", "vfat", "efivarfs",
                 "loop", "sd_mod"):  # fmt: skip
        module = f"/{name}.ko".encode()
        assert module + b":" in moddep, f"{module!r} not in modules.dep"
    alias = _cpio(archive, "-i", "--to-stdout", f"usr/lib/modules/{version}/modules.alias")
    assert b" e1000\n" in alias  # depmod ran: coldplug by modalias can find drivers

    baked = _cpio(archive, "-i", "--to-stdout", shim_iso.TRUST_ROOT_IN_SHIM)
    assert hashlib.sha256(baked).digest() == hashlib.sha256(built.root_json).digest()

    init = _cpio(archive, "-i", "--to-stdout", "init").decode()
    assert init.startswith("#!/bin/sh")
    assert "python3 -m spk_visor deploy receive" in init
    # PID 1 is /init, a shell: busybox's plain `reboot` signals it and nothing happens.
    assert 'deploy receive --reboot-cmd "reboot -f"' in init
    grub = _extract(built.iso, "/boot/grub/grub.cfg", built.work / "grub.cfg").read_text()
    assert "console=tty0 console=ttyS0,115200" in grub
    assert "terminal_output serial console" in grub


@pytest.fixture(scope="module")
def unpacked(built: Built) -> Path:
    root = built.work / "initramfs"
    root.mkdir()
    subprocess.run(
        ["cpio", "--quiet", "-idm", "--no-absolute-filenames"],
        input=_initramfs(built),
        cwd=root,
        check=True,
    )
    return root


# Every tool the installer runs, started from the initramfs itself: a library that ldd
# missed, or a broken copy, fails here in seconds instead of on a blank machine.
_TOOLS = [
    ["/usr/sbin/sfdisk", "--version"],
    ["/usr/sbin/wipefs", "--version"],
    ["/usr/sbin/blkid", "-V"],
    ["/usr/bin/lsblk", "--version"],
    ["/usr/bin/partx", "--version"],
    ["/usr/sbin/mkfs.ext4", "-V"],
    ["/usr/sbin/mkfs.vfat", "--help"],
    ["/usr/bin/mcopy", "--version"],
    ["/usr/bin/mformat", "--version"],
    ["/usr/sbin/grub-install", "--version"],
    ["/usr/bin/grub-mkimage", "--version"],
    ["/usr/sbin/grub-probe", "--version"],
    ["/usr/bin/grub-editenv", "--version"],
    ["/usr/bin/udevadm", "--version"],
    ["/bin/busybox", "udhcpc", "--help"],
    # The kernel's request_module path: without it ext4 cannot load crc32c at mount time
    # on a CPU without SSE4.2 (QEMU's default), and the install fails at mkfs.
    ["/sbin/modprobe", "--version"],
]


def test_tools_and_python_run_from_the_initramfs(built: Built, unpacked: Path) -> None:
    for argv in _TOOLS:
        proc = subprocess.run(
            ["chroot", str(unpacked), *argv], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, f"{argv}: {proc.stderr.strip()[-500:]}"
        assert "error while loading shared libraries" not in proc.stderr
    check = (
        "import sys; sys.path.insert(0, '/usr/lib/spk');"
        "import spk_visor.cli, spake2, zstandard, ssl, lzma, ctypes;"
        "from cryptography.hazmat.primitives.asymmetric import ed25519;"
        "ed25519.Ed25519PrivateKey.generate();"
        "zstandard.ZstdDecompressor().decompress(zstandard.ZstdCompressor().compress(b'x'));"
        "print(sys.executable, sys.version_info[:2])"
    )
    proc = subprocess.run(
        ["chroot", str(unpacked), "/usr/bin/python3", "-I", "-c", check],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "/usr/bin/python3 (3, 11)"
    # kmod in the initramfs resolves a module with its dependencies and soft dependencies.
    modprobe = ["/usr/sbin/modprobe", "-S", built.result.kernel_version, "--show-depends", "ext4"]
    proc = subprocess.run(
        ["chroot", str(unpacked), *modprobe],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for needed in ("/jbd2.ko", "/mbcache.ko", "/ext4.ko", "crc32c"):
        assert needed in proc.stdout, proc.stdout


def test_mtools_write_an_esp_from_the_initramfs(unpacked: Path) -> None:
    """The installer writes BOOTX64.EFI with mmd and mcopy: they must work inside the shim
    (they need glibc's CP850 converter, which the build host has and the shim did not)."""
    (unpacked / "tmp/esp.img").write_bytes(b"")
    os.truncate(unpacked / "tmp/esp.img", 64 << 20)
    (unpacked / "tmp/file.efi").write_bytes(b"MZ" + os.urandom(4096))
    env = {"PATH": "/usr/sbin:/usr/bin:/bin", "MTOOLS_SKIP_CHECK": "1", "LANG": "C.UTF-8"}
    try:
        for argv in (
            ["/usr/sbin/mkfs.vfat", "-F", "32", "/tmp/esp.img"],
            ["/usr/bin/mmd", "-i", "/tmp/esp.img", "::/EFI", "::/EFI/BOOT"],
            ["/usr/bin/mcopy", "-i", "/tmp/esp.img", "/tmp/file.efi", "::/EFI/BOOT/BOOTX64.EFI"],
            ["/usr/bin/mcopy", "-n", "-i", "/tmp/esp.img", "::/EFI/BOOT/BOOTX64.EFI", "/tmp/back"],
        ):
            proc = subprocess.run(
                ["chroot", str(unpacked), *argv], capture_output=True, text=True, env=env,
                check=False,
            )  # fmt: skip
            assert proc.returncode == 0, f"{argv}: {proc.stderr.strip()[-500:]}"
        assert (unpacked / "tmp/back").read_bytes() == (unpacked / "tmp/file.efi").read_bytes()
    finally:
        for name in ("esp.img", "file.efi", "back"):
            (unpacked / "tmp" / name).unlink(missing_ok=True)


# The receiver's screen: the code (nameplate-secret) the operator types on the donor.
RECEIVER = re.compile(r"deploy code:\s+\d{2,4}-[0-9A-HJKMNP-TV-Z]{5}\s")


def test_boots_with_seabios(built: Built) -> None:
    boot = boot_iso(built.iso, built.work / "bios", uefi=False, until=RECEIVER, timeout=240)
    assert boot.matched, f"no receiver code line in time; serial tail:\n{boot.log[-3000:]}"
    assert READY.search(boot.log)
    assert "SPK-SHIM boot: BIOS" in boot.log
    # The e1000 driver came from the initramfs by coldplug and udhcpc got a lease.
    assert re.search(r"SPK-SHIM net: eth0 10\.0\.2\.\d+/", boot.log), boot.log[-3000:]


def test_boots_with_ovmf(built: Built) -> None:
    boot = boot_iso(built.iso, built.work / "uefi", uefi=True, until=RECEIVER, timeout=240)
    assert boot.matched, f"no receiver code line in time; serial tail:\n{boot.log[-3000:]}"
    assert "SPK-SHIM boot: UEFI" in boot.log
    assert READY.search(boot.log)


def test_corrupt_trust_root_is_refused_before_building(tmp_path: Path) -> None:
    _prereqs()
    raw = bytearray(Pki().root_env().to_bytes())
    raw[raw.index(b'"payload"') + 15] ^= 0x01  # one bit of the signed payload
    bad = tmp_path / "root.json"
    bad.write_bytes(bytes(raw))
    out = tmp_path / "x.iso"
    with pytest.raises(VerificationError, match="trust root"):
        shim_iso.build_iso(out, kernel=tmp_path / "no-kernel", trust_root=bad)
    assert not out.exists()
