"""The BIOS preparation (bootloader.prepare_bios) against grub-install, on a loop disk.

prepare_bios runs while the base image streams to the same disk, so it must not fsync
file by file the way grub-install does; and what it leaves in boot/grub must be what
`grub-install --no-bootsector` leaves there, core.img byte for byte, because finalize's
grub-bios-setup and the boot tests rely on it. A small GPT disk (BIOS-boot + ext4) gets
grub-install's tree first (moved aside as the reference), then prepare_bios's, under strace.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spk_visor.deploy import bootloader
from tests.support.prereq import need_command, need_commands, need_root

DISK_MIB = 96
BIOS_BOOT_TYPE = "21686148-6449-6E61-6E65-744E656F6E61"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
SYNC_CALLS = ("fsync", "fdatasync", "syncfs", "sync", "sync_file_range", "msync")


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


@dataclass
class Prepared:
    reference: Path  # grub-install --no-bootsector's boot/grub
    prepared: Path  # prepare_bios's boot/grub
    sync_calls: dict[str, int]  # fsync-family system calls of prepare_bios, by name


def _strace_counts(summary: str) -> dict[str, int]:
    """`strace -c`'s table: "% time  seconds  usecs/call  calls  [errors]  syscall"."""
    counts: dict[str, int] = {}
    for line in summary.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] in SYNC_CALLS and fields[3].isdigit():
            counts[fields[-1]] = int(fields[3])
    return counts


def _partition(loop: str, number: int) -> str:
    """The loop device's partition node; udev may need a moment (bounded)."""
    node = Path(f"{loop}p{number}")
    for _ in range(50):
        if node.exists():
            return str(node)
        subprocess.run(["partx", "--update", loop], capture_output=True, timeout=30, check=False)
        time.sleep(0.2)
    raise AssertionError(f"{node} did not appear")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prepared]:
    need_root()
    need_commands(
        (
            ("strace", "strace"),
            ("sfdisk", "fdisk"),
            ("losetup", "util-linux"),
            ("mkfs.ext4", "e2fsprogs"),
            ("grub-mkimage", "grub-common"),
        )
    )
    need_command("grub-install", "grub2-common")
    if not bootloader.BIOS_SETUP.is_file():
        pytest.skip(f"{bootloader.BIOS_SETUP} missing: install grub-pc-bin")
    tmp = tmp_path_factory.mktemp("bios-prep")
    image = tmp / "disk.img"
    with image.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    subprocess.run(
        ["sfdisk", "--quiet", str(image)],
        input=f"label: gpt\nsize=2048, type={BIOS_BOOT_TYPE}\ntype={LINUX_TYPE}\n",
        text=True,
        capture_output=True,
        timeout=60,
        check=True,
    )
    loop = _run(["losetup", "--find", "--show", "--partscan", str(image)]).strip()
    mnt = tmp / "mnt"
    mnt.mkdir()
    try:
        data = _partition(loop, 2)
        _run(["mkfs.ext4", "-q", data])
        _run(["mount", data, str(mnt)])
        reference = mnt / "reference"
        bootloader._grub_install_bios(loop, mnt / "boot", "--no-bootsector")
        (mnt / "boot").rename(reference)
        summary = tmp / "strace.txt"
        code = (
            "import sys; from pathlib import Path; from spk_visor.deploy import bootloader; "
            "assert bootloader.prepare_bios(sys.argv[1], Path(sys.argv[2]))"
        )
        _run(
            [
                *("strace", "-f", "-c", "-o", str(summary), "-e", f"trace={','.join(SYNC_CALLS)}"),
                *(sys.executable, "-c", code, loop, str(mnt / "boot")),
            ]
        )
        yield Prepared(
            reference / "grub", mnt / "boot" / "grub", _strace_counts(summary.read_text())
        )
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60, check=False)
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30, check=False)


def test_bios_prep_does_not_sync_file_by_file(prepared: Prepared) -> None:
    """grub-install fsyncs each of its ~330 files; the prep leaves durability to the
    installer's one syncfs of the data partition in finalize (only grub-mkimage's own
    fsync of core.img remains)."""
    assert sum(prepared.sync_calls.values()) <= 1, prepared.sync_calls


def test_bios_prep_leaves_what_grub_install_leaves(prepared: Prepared) -> None:
    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    reference, ours = tree(prepared.reference), tree(prepared.prepared)
    # grub-install creates an empty grubenv when there is none; in a deploy,
    # write_config has written the real one before the prep runs.
    reference.pop("grubenv")
    ours.pop("grubenv", None)
    assert sorted(ours) == sorted(reference)
    assert "i386-pc/core.img" in ours and "i386-pc/normal.mod" in ours
    differ = [name for name in reference if ours[name] != reference[name]]
    assert differ == [], "core.img and every module must be grub-install's bytes"
