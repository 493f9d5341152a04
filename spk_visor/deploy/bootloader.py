"""GRUB for an installed disk: the menu, the BIOS path, the EFI fallback path, and undoing them.

Where GRUB lives. Both root slots are raw images that OTA rewrites whole, so nothing of
GRUB's may live inside them: the GRUB boot directory (modules, grub.cfg, grubenv) is
`boot/grub` on the data partition, which survives base updates, and the installed system
bind-mounts it at /boot (see install.py's fstab), where the OTA base class expects
/boot/grub/grubenv.

How each entry finds its slot. The data filesystem is found by its UUID (`search
--fs-uuid`); the slot is then the partition with the slot's number on that same disk. The
slots cannot be found by filesystem UUID: slot B receives a copy of the same image one day,
so A and B may carry the same filesystem UUID. The kernel gets `root=PARTUUID=`, the GPT
partition GUID written at install time, unique per slot and untouched by image writes.
Never a /dev name: loop names leak into generated configs otherwise (elbe#431).

The EFI side does not mount the ESP (this workplace's kernel cannot mount vfat, and an
installer should not need to): BOOTX64.EFI is built with grub-mkimage, with an early
config that searches the data filesystem by UUID, and copied in with mtools.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from spk_visor.errors import OperatorNeededError
from spk_visor.install import blockdev, layout, runner
from spk_visor.ota import durable

# The kernel command line every slot gets (deploy.md, "Kernel command line for the hypervisor").
IOMMU_ARGS = "intel_iommu=on amd_iommu=on iommu=pt"
CONSOLE_ARGS = "console=tty0 console=ttyS0,115200"
ENTRY_IDS = {"a": "smechvisor-a", "b": "smechvisor-b"}
# GPT partition numbers of the slots, from the `ab` layout's order (numbered from 1).
SLOT_PARTITION = {slot: layout.PART_NAMES.index(f"root-{slot}") + 1 for slot in ("a", "b")}
EFI_PATH = "::/EFI/BOOT/BOOTX64.EFI"
MBR_CODE = 440  # bytes of boot code in front of the MBR's partition table
# What BOOTX64.EFI carries itself, so it can find and read grub.cfg with no module loading;
# the rest loads from boot/grub/x86_64-efi on the data partition.
EFI_MODULES = (
    *("part_gpt", "part_msdos", "fat", "ext2", "search", "search_fs_uuid", "normal"),
    *("configfile", "linux", "echo", "test", "regexp", "loadenv", "serial", "terminal"),
    *("efi_gop", "efi_uga", "all_video", "gzio", "zstd", "xzio", "halt", "reboot", "sleep"),
    "minicmd",
)
BIOS_MODULES = ("part_gpt", "ext2", "search_fs_uuid")
_TIMEOUT_S = 300
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


class BootloaderError(OperatorNeededError):
    """A bootloader step failed; `step` says which ("bios", "efi", "config")."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class BootIds:
    data_fs_uuid: str  # the filesystem holding boot/grub
    slot_partuuid: dict[str, str]  # "a"/"b" -> GPT partition GUID


def _run(argv: list[str], step: str, env: dict[str, str] | None = None) -> str:
    return runner.run_checked(
        argv, lambda detail: BootloaderError(step, detail), timeout=_TIMEOUT_S, env=env
    )


def kernel_args(slot: str, ids: BootIds) -> str:
    return (
        f"root=PARTUUID={ids.slot_partuuid[slot]} ro smechvisor.slot={slot} "
        f"{IOMMU_ARGS} {CONSOLE_ARGS}"
    )


def grub_cfg(ids: BootIds, *, timeout_s: int = 3) -> str:
    """The installed grub.cfg: serial + console, grubenv one-shot/default, one entry per slot."""
    entries = []
    for slot in ("a", "b"):
        entries.append(
            f"menuentry 'SmechVisor (slot {slot.upper()})' --id {ENTRY_IDS[slot]} {{\n"
            f"    search --no-floppy --fs-uuid --set=spk_data {ids.data_fs_uuid}\n"
            # "hd0,gpt5" -> "hd0": the slot is a sibling partition of the data partition.
            '    regexp --set=1:spk_disk "^([^,]+)," "$spk_data"\n'
            f"    set root=($spk_disk,gpt{SLOT_PARTITION[slot]})\n"
            f"    linux /boot/vmlinuz {kernel_args(slot, ids)}\n"
            "    initrd /boot/initrd.img\n"
            "}\n"
        )
    return (
        "# Written by spk-visor deploy. Slots are found via the data filesystem's UUID.\n"
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        f"set timeout={timeout_s}\n"
        "set default=smechvisor-a\n"
        "if [ -s $prefix/grubenv ]; then\n"
        "    load_env\n"
        "fi\n"
        # The OTA base class: next_entry is a one-shot trial, saved_entry the default.
        'if [ "${next_entry}" ]; then\n'
        '    set default="${next_entry}"\n'
        "    set next_entry=\n"
        "    save_env next_entry\n"
        'elif [ "${saved_entry}" ]; then\n'
        '    set default="${saved_entry}"\n'
        "fi\n" + "".join(entries)
    )


def write_config(boot_dir: Path, ids: BootIds, *, timeout_s: int = 3) -> Path:
    """boot_dir/grub/grub.cfg and a grubenv naming slot A as the default."""
    grub_dir = boot_dir / "grub"
    grub_dir.mkdir(parents=True, exist_ok=True)
    cfg = grub_dir / "grub.cfg"
    durable.write_bytes(cfg, grub_cfg(ids, timeout_s=timeout_s).encode(), mode=0o644)
    env = grub_dir / "grubenv"
    editenv = shutil.which("grub-editenv")
    if editenv is None:
        raise BootloaderError("config", "grub-editenv not found (install grub-common)")
    env.unlink(missing_ok=True)
    _run([editenv, str(env), "create"], "config")
    _run([editenv, str(env), "set", f"saved_entry={ENTRY_IDS['a']}"], "config")
    return cfg


BIOS_LIB = Path("/usr/lib/grub/i386-pc")
BIOS_SETUP = BIOS_LIB / "grub-bios-setup"
# What grub-install copies from BIOS_LIB next to the modules (grub-install-common.c): the
# module lists GRUB reads at run time, efiemu, and boot.img for grub-bios-setup.
BIOS_FILES = (
    *("boot.img", "efiemu32.o", "efiemu64.o", "modinfo.sh", "moddep.lst", "command.lst"),
    *("fs.lst", "partmap.lst", "parttool.lst", "video.lst", "crypto.lst", "terminal.lst"),
)
FONT = Path("/usr/share/grub/unicode.pf2")
LOCALES = Path("/usr/share/locale")


def _grub_install_bios(disk: str, boot_dir: Path, *extra: str) -> None:
    tool = shutil.which("grub-install")
    if tool is None:
        raise BootloaderError("bios", "grub-install not found (install grub2-common, grub-pc-bin)")
    _run(
        [
            tool,
            "--target=i386-pc",
            f"--boot-directory={boot_dir}",
            f"--modules={' '.join(BIOS_MODULES)}",
            "--no-floppy",
            *extra,
            disk,
        ],
        "bios",
    )


def _bios_prefix(disk: str, boot_dir: Path) -> str:
    """GRUB's prefix for boot_dir/grub the way grub-install writes it when the boot
    directory is on the disk core.img boots from: `(,gptN)/path`, no drive name, no
    search. boot_dir must be on a partition of `disk`, on a filesystem mounted at its
    root (no bind mount), as the installer's data partition is."""
    dev = os.stat(boot_dir).st_dev
    sys_part = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    try:
        number = int((sys_part / "partition").read_text())
        parent = (sys_part.resolve().parent / "dev").read_text().strip()
    except (OSError, ValueError):
        raise BootloaderError("bios", f"{boot_dir} is not on a disk partition") from None
    rdev = os.stat(disk).st_rdev
    if parent != f"{os.major(rdev)}:{os.minor(rdev)}":
        raise BootloaderError("bios", f"{boot_dir} is not on {disk}")
    root = boot_dir
    while not os.path.ismount(root):
        root = root.parent
    return f"(,gpt{number})/{(boot_dir / 'grub').relative_to(root)}"


def prepare_bios(disk: str, boot_dir: Path) -> bool:
    """What `grub-install --no-bootsector` leaves in boot_dir/grub (modules, fonts,
    locales, core.img), nothing on the disk's boot path: safe while slot A is still being
    written. False when this host has no grub-bios-setup to finish with, and install_bios
    must do the whole job.

    Not grub-install itself: it fsyncs every file it copies (some 330), which competes
    with the image stream on the same disk. Plain copies instead, made durable by the
    installer's one syncfs of the data partition before grub-bios-setup; core.img
    comes from grub-mkimage with grub-install's arguments (same module order, so the
    same bytes; tests/integration/test_deploy_bootloader.py compares the two trees)."""
    if not BIOS_SETUP.is_file():
        return False
    mkimage = shutil.which("grub-mkimage")
    if mkimage is None:
        raise BootloaderError("bios", "grub-mkimage not found (install grub-common)")
    grub = boot_dir / "grub"
    target = grub / "i386-pc"
    target.mkdir(parents=True, exist_ok=True)
    prefix = _bios_prefix(disk, boot_dir)
    for item in BIOS_LIB.iterdir():
        if item.suffix == ".mod" or item.name in BIOS_FILES:
            shutil.copyfile(item, target / item.name)
    # grub-install's defaults (--fonts=unicode --locales=all); the menu needs neither,
    # but the tree stays the one grub-install makes. No theme: grub-install copies
    # starfield only where grub-theme-starfield is installed, and the menu uses none.
    if FONT.is_file():
        (grub / "fonts").mkdir(exist_ok=True)
        shutil.copyfile(FONT, grub / "fonts" / FONT.name)
    catalogs = sorted(LOCALES.glob("*/LC_MESSAGES/grub.mo"))
    if catalogs:
        (grub / "locale").mkdir(exist_ok=True)
    for mo in catalogs:
        shutil.copyfile(mo, grub / "locale" / f"{mo.parent.parent.name}.mo")
    # grub-install adds the modules that read boot_dir's partition table and filesystem
    # (GPT and ext4: the installer makes both), then the BIOS disk driver, after
    # --modules; the order is the order in core.img.
    modules = dict.fromkeys((*BIOS_MODULES, "ext2", "part_gpt", "biosdisk"))
    _run(
        [
            *(mkimage, "--directory", str(BIOS_LIB), "--prefix", prefix),
            *("--output", str(target / "core.img"), "--format", "i386-pc"),
            *("--compression", "auto", *modules),
        ],
        "bios",
    )
    # No sync here: this runs while the image streams to the same disk, and a syncfs
    # would also write back the store copy's pages mid-stream. The installer's finalize
    # syncs the data partition once, before grub-bios-setup makes any of this bootable.
    return True


def install_bios(disk: str, boot_dir: Path, prepared: bool = False) -> None:
    """boot.img into the MBR, core.img into the BIOS-boot partition, modules into boot_dir.
    After prepare_bios, only grub-bios-setup runs: the same bytes as a whole grub-install
    (checked, see prepare_bios), in a quarter of its time, because the modules are in
    place already."""
    if prepared:
        _run([str(BIOS_SETUP), f"--directory={boot_dir / 'grub' / 'i386-pc'}", disk], "bios")
    else:
        _grub_install_bios(disk, boot_dir)


def build_efi_image(out: Path, data_fs_uuid: str) -> None:
    """A standalone BOOTX64.EFI whose early config finds boot/grub on the data filesystem."""
    tool = shutil.which("grub-mkimage")
    if tool is None:
        raise BootloaderError("efi", "grub-mkimage not found (install grub-common)")
    with tempfile.TemporaryDirectory(prefix="spk-efi-") as tmp:
        early = Path(tmp, "early.cfg")
        early.write_text(
            f"search --no-floppy --fs-uuid --set=root {data_fs_uuid}\n"
            "set prefix=($root)/boot/grub\n"
        )
        _run(
            [
                tool,
                "-O",
                "x86_64-efi",
                "-o",
                str(out),
                "-p",
                "/boot/grub",
                "-c",
                str(early),
                *EFI_MODULES,
            ],
            "efi",
        )


EFI_STAGED = "spk-BOOTX64.EFI"


def prepare_efi(boot_dir: Path, data_fs_uuid: str) -> Path:
    """The EFI modules next to grub.cfg and BOOTX64.EFI built into boot_dir/grub, nothing on
    the ESP yet; returns the built image for install_efi."""
    modules = Path("/usr/lib/grub/x86_64-efi")
    if not modules.is_dir():
        raise BootloaderError("efi", f"{modules} missing (install grub-efi-amd64-bin)")
    # Modules next to grub.cfg, for anything the image does not embed (`insmod` in the menu).
    target = boot_dir / "grub" / "x86_64-efi"
    target.mkdir(parents=True, exist_ok=True)
    for item in modules.iterdir():
        if item.suffix in (".mod", ".lst"):
            shutil.copyfile(item, target / item.name)
    image = boot_dir / "grub" / EFI_STAGED
    build_efi_image(image, data_fs_uuid)
    return image


def install_efi(esp: str, image: Path) -> int:
    """The removable-media fallback path EFI/BOOT/BOOTX64.EFI on the ESP, from the image
    prepare_efi built (removed afterwards); returns its size.

    Two mtools runs: one copies a tree EFI/BOOT/BOOTX64.EFI (-s makes the folders or
    enters them, -o replaces an older loader), one reads the file back. A `mdir` probe
    and a `mmd` per folder would be four more process starts between the image stream
    and the REPORT."""
    with tempfile.TemporaryDirectory(prefix="spk-efi-") as tmp:
        boot = Path(tmp, "EFI", "BOOT")
        boot.mkdir(parents=True)
        # mcopy reads through the link: the image is not copied once more on the way.
        (boot / "BOOTX64.EFI").symlink_to(image.resolve())
        _run(["mcopy", "-s", "-o", "-i", esp, str(boot.parent), "::/"], "efi", MTOOLS_ENV)
        # Read it back through mtools: what the firmware will read is what we built.
        back = Path(tmp, "back.efi")
        _run(["mcopy", "-n", "-i", esp, EFI_PATH, str(back)], "efi", MTOOLS_ENV)
        if back.read_bytes() != image.read_bytes():
            raise BootloaderError("efi", "BOOTX64.EFI read back from the ESP differs")
        size = image.stat().st_size
    image.unlink()
    return size


def _mexists(esp: str, path: str) -> bool:
    done = subprocess.run(
        ["mdir", "-b", "-i", esp, path],
        capture_output=True,
        timeout=_TIMEOUT_S,
        check=False,
        env={**os.environ, **MTOOLS_ENV},
    )
    return done.returncode == 0


def remove_boot_code(disk: str, bios_part: str | None, esp: str | None) -> list[str]:
    """Undo whatever of the boot path exists; best effort, returns what could not be done."""
    problems: list[str] = []
    try:
        # MBR boot code only (0..440): the protective MBR's partition entry stays valid.
        blockdev.zero_head(disk, MBR_CODE, exclusive=False)
    except OSError as e:
        problems.append(f"MBR boot code: {e}")
    if bios_part:
        try:
            blockdev.zero_head(bios_part, exclusive=False)
        except OSError as e:
            problems.append(f"BIOS boot partition: {e}")
    if esp and os.path.exists(esp):
        subprocess.run(
            ["mdel", "-i", esp, EFI_PATH],
            capture_output=True,
            timeout=_TIMEOUT_S,
            check=False,
            env={**os.environ, **MTOOLS_ENV},
        )
        if _mexists(esp, EFI_PATH):
            problems.append("BOOTX64.EFI could not be removed")
    return problems
