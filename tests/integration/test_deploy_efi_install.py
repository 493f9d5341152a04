"""bootloader.install_efi on a real FAT32 ESP (an image file, mtools as the deploy runs
it): the fallback path holds exactly the built image, on a fresh ESP and over an older
one, and the step costs two mtools runs (write the tree, read it back), not six (a
`mdir` probe and a `mmd` per folder, then the two copies): it sits between the image
stream and the REPORT, and each run is a process start."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from spk_visor.deploy import bootloader

TOOLS = ("mkfs.vfat", "mcopy", "mdir", "mmd")


def fat(image: Path, size: int, *mkfs: str) -> Path:
    """A FAT filesystem in an image file (mtools reads and writes it as the ESP)."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install-sysdeps)")
    with image.open("wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.vfat", *mkfs, str(image)], check=True, capture_output=True)
    return image


@pytest.fixture
def esp(tmp_path: Path) -> Path:
    return fat(tmp_path / "esp.img", 64 << 20, "-F", "32")


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """mtools behind wrappers that log each run (one line per process) to the file returned."""
    log = tmp_path / "mtools.log"
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    for tool in ("mcopy", "mdir", "mmd", "mdel"):
        real = shutil.which(tool)
        assert real is not None
        script = wrappers / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\nexec "{real}" "$@"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}{os.environ['PATH']}")
    return log


def read_back(esp: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "read.efi"
    out.unlink(missing_ok=True)
    subprocess.run(
        ["mcopy", "-n", "-i", str(esp), bootloader.EFI_PATH, str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, **bootloader.MTOOLS_ENV},
    )
    return out.read_bytes()


def test_fresh_esp_gets_the_image_in_two_mtools_runs(
    esp: Path, counted: Path, tmp_path: Path
) -> None:
    image = tmp_path / "spk-BOOTX64.EFI"
    payload = os.urandom(300_000)
    image.write_bytes(payload)
    size = bootloader.install_efi(str(esp), image)
    runs = counted.read_text().splitlines()
    assert size == len(payload)
    assert not image.exists()  # the staged image is removed once it is on the ESP
    assert read_back(esp, tmp_path) == payload
    assert len(runs) == 2, runs
    assert [r.split()[0] for r in runs] == ["mcopy", "mcopy"], runs


def test_an_older_loader_is_replaced(esp: Path, counted: Path, tmp_path: Path) -> None:
    image = tmp_path / "spk-BOOTX64.EFI"
    image.write_bytes(os.urandom(500_000))
    bootloader.install_efi(str(esp), image)
    newer = os.urandom(120_000)  # shorter: no tail of the older file may remain
    image.write_bytes(newer)
    assert bootloader.install_efi(str(esp), image) == len(newer)
    assert read_back(esp, tmp_path) == newer


def test_a_full_esp_is_a_bootloader_error(counted: Path, tmp_path: Path) -> None:
    """The write failing (no room) is reported, not taken for success."""
    small = fat(tmp_path / "small.img", 1 << 20)
    image = tmp_path / "spk-BOOTX64.EFI"
    image.write_bytes(os.urandom(2 << 20))
    with pytest.raises(bootloader.BootloaderError):
        bootloader.install_efi(str(small), image)
