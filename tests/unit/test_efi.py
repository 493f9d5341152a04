"""smechvisord.efi against efivars-like directories (and, as root, a real immutable file)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from smechvisord import efi
from smechvisord.efi import (
    BOOT_TO_FW_UI,
    EFI_GLOBAL_GUID,
    OS_INDICATIONS,
    OS_INDICATIONS_SUPPORTED,
    EfiError,
    firmware_setup_support,
    request_firmware_setup,
)
from tests.support.prereq import need_command, need_root


def var_bytes(value: int, attributes: int = 7) -> bytes:
    return struct.pack("<IQ", attributes, value)


@pytest.fixture
def efi_dir(tmp_path: Path) -> Path:
    """<sysroot>/sys/firmware/efi with a mounted-looking efivars holding a few variables."""
    d = tmp_path / "sys" / "firmware" / "efi"
    (d / "efivars").mkdir(parents=True)
    (d / "efivars" / f"BootOrder-{EFI_GLOBAL_GUID}").write_bytes(b"\x07\x00\x00\x00\x01\x00")
    return d


@pytest.fixture
def efivars(efi_dir: Path) -> Path:
    return efi_dir / "efivars"


def test_names() -> None:
    assert EFI_GLOBAL_GUID == "8be4df61-93ca-11d2-aa0d-00e098032b8c"
    assert BOOT_TO_FW_UI == 0x1
    assert OS_INDICATIONS == "OsIndications-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def test_ioctl_numbers_match_linux_uapi() -> None:
    # <linux/fs.h> on x86_64: FS_IOC_GETFLAGS 0x80086601, FS_IOC_SETFLAGS 0x40086602.
    if struct.calcsize("l") != 8:
        pytest.skip("the expected numbers below are the 64-bit ones")
    assert efi.FS_IOC_GETFLAGS == 0x80086601
    assert efi.FS_IOC_SETFLAGS == 0x40086602


# --- request_firmware_setup -------------------------------------------------------------


def test_absent_variable_is_created_with_exact_bytes(efivars: Path) -> None:
    result = request_firmware_setup(efivars)
    assert result == {"previous": 0, "value": 1, "written": True}
    data = (efivars / OS_INDICATIONS).read_bytes()
    assert data == bytes.fromhex("07000000" + "0100000000000000")


def test_other_bits_are_preserved(efivars: Path) -> None:
    path = efivars / OS_INDICATIONS
    path.write_bytes(var_bytes(0x4))
    result = request_firmware_setup(efivars)
    assert result == {"previous": 0x4, "value": 0x5, "written": True}
    assert path.read_bytes() == bytes.fromhex("07000000" + "0500000000000000")


def test_high_bits_survive_little_endian_round_trip(efivars: Path) -> None:
    path = efivars / OS_INDICATIONS
    path.write_bytes(var_bytes(0x8000_0000_0000_0040))
    result = request_firmware_setup(efivars)
    assert result["value"] == 0x8000_0000_0000_0041
    assert path.read_bytes() == b"\x07\x00\x00\x00" + (0x8000_0000_0000_0041).to_bytes(8, "little")


def test_bit_already_set_writes_nothing(efivars: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = efivars / OS_INDICATIONS
    path.write_bytes(var_bytes(0x5))

    def no_write(fd: int, data: bytes) -> int:
        raise AssertionError("nothing should be written when bit 0 is already set")

    def no_write_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise AssertionError(f"opened for writing: {path}")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    real_open = os.open
    monkeypatch.setattr(os, "write", no_write)
    monkeypatch.setattr(os, "open", no_write_open)
    assert request_firmware_setup(efivars) == {"previous": 5, "value": 5, "written": False}
    assert path.read_bytes() == var_bytes(0x5)


def test_whole_variable_goes_out_in_one_write(
    efivars: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (efivars / OS_INDICATIONS).write_bytes(var_bytes(0x4))
    writes: list[bytes] = []
    real_write = os.write

    def recording_write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    request_firmware_setup(efivars)
    assert writes == [bytes.fromhex("07000000" + "0500000000000000")]


def test_short_write_is_an_error(efivars: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "write", lambda fd, data: 4)
    with pytest.raises(EfiError, match="short write"):
        request_firmware_setup(efivars)


def test_malformed_existing_variable_is_not_overwritten(efivars: Path) -> None:
    path = efivars / OS_INDICATIONS
    path.write_bytes(b"\x07\x00\x00\x00\x01")
    with pytest.raises(EfiError, match="5 bytes"):
        request_firmware_setup(efivars)
    assert path.read_bytes() == b"\x07\x00\x00\x00\x01"


def test_missing_efivars_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EfiError, match="not mounted"):
        request_firmware_setup(tmp_path / "nope")


def test_filesystem_without_flags_ioctl_is_written_anyway(
    efivars: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (efivars / OS_INDICATIONS).write_bytes(var_bytes(0))
    calls: list[int] = []

    def unsupported(fd: int, request: int, arg: bytes = b"") -> bytes:
        calls.append(request)
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    monkeypatch.setattr(fcntl, "ioctl", unsupported)
    assert request_firmware_setup(efivars)["written"] is True
    assert calls == [efi.FS_IOC_GETFLAGS]
    assert (efivars / OS_INDICATIONS).read_bytes() == var_bytes(1)


def test_immutable_flag_cleared_and_restored(
    efivars: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ioctl sequence, seen through a fake: get, clear the flag, write, restore."""
    (efivars / OS_INDICATIONS).write_bytes(var_bytes(0))
    events: list[tuple[str, int]] = []
    flags = efi.FS_IMMUTABLE_FL | 0x80000  # immutable plus an extent flag to keep
    real_write = os.write

    def fake_ioctl(fd: int, request: int, arg: bytes = b"") -> bytes:
        nonlocal flags
        if request == efi.FS_IOC_GETFLAGS:
            events.append(("get", flags))
            return struct.pack("I", flags) + bytes(len(arg) - 4)
        assert request == efi.FS_IOC_SETFLAGS
        flags = struct.unpack("I", arg)[0]
        events.append(("set", flags))
        return arg

    def recording_write(fd: int, data: bytes) -> int:
        events.append(("write", flags))
        return real_write(fd, data)

    monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)
    monkeypatch.setattr(os, "write", recording_write)
    request_firmware_setup(efivars)
    assert events == [
        ("get", 0x80010),
        ("set", 0x80000),
        ("write", 0x80000),
        ("set", 0x80010),
    ]


def test_flags_restored_when_the_write_fails(
    efivars: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (efivars / OS_INDICATIONS).write_bytes(var_bytes(0))
    flags = efi.FS_IMMUTABLE_FL

    def fake_ioctl(fd: int, request: int, arg: bytes = b"") -> bytes:
        nonlocal flags
        if request == efi.FS_IOC_GETFLAGS:
            return struct.pack("I", flags) + bytes(len(arg) - 4)
        flags = struct.unpack("I", arg)[0]
        return arg

    def failing_write(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)
    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(EfiError, match="variable store is full"):
        request_firmware_setup(efivars)
    assert flags == efi.FS_IMMUTABLE_FL


def test_clearing_flag_not_permitted_is_a_clear_error(
    efivars: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (efivars / OS_INDICATIONS).write_bytes(var_bytes(0))

    def fake_ioctl(fd: int, request: int, arg: bytes = b"") -> bytes:
        if request == efi.FS_IOC_GETFLAGS:
            return struct.pack("I", efi.FS_IMMUTABLE_FL) + bytes(len(arg) - 4)
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)
    with pytest.raises(EfiError, match="CAP_LINUX_IMMUTABLE"):
        request_firmware_setup(efivars)
    assert (efivars / OS_INDICATIONS).read_bytes() == var_bytes(0)


def test_interrupted_read_is_retried(efivars: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (efivars / OS_INDICATIONS).write_bytes(var_bytes(0x4))
    real_read = os.read
    interruptions = [InterruptedError(errno.EINTR, "Interrupted system call")] * 2

    def flaky_read(fd: int, n: int) -> bytes:
        if interruptions:
            raise interruptions.pop()
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", flaky_read)
    monkeypatch.setattr(efi, "_RETRY_PAUSE", 0.0)
    assert request_firmware_setup(efivars)["previous"] == 0x4


def test_endless_interruptions_give_up(efivars: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (efivars / OS_INDICATIONS).write_bytes(var_bytes(0x4))

    def always_interrupted(fd: int, n: int) -> bytes:
        raise InterruptedError(errno.EINTR, "Interrupted system call")

    monkeypatch.setattr(os, "read", always_interrupted)
    monkeypatch.setattr(efi, "_RETRY_PAUSE", 0.0)
    with pytest.raises(EfiError, match="interrupted"):
        request_firmware_setup(efivars)


# --- firmware_setup_support ---------------------------------------------------------------


def test_supported(efi_dir: Path) -> None:
    (efi_dir / "efivars" / OS_INDICATIONS_SUPPORTED).write_bytes(var_bytes(0x6 | 0x1, 6))
    assert firmware_setup_support(efi_dir) == (True, "")


def test_bios_boot(tmp_path: Path) -> None:
    ok, reason = firmware_setup_support(tmp_path / "sys" / "firmware" / "efi")
    assert not ok
    assert "BIOS" in reason
    assert "vendor key" in reason


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_efivars_not_mounted(efi_dir: Path, make: str) -> None:
    shutil.rmtree(efi_dir / "efivars")
    if make == "empty":
        (efi_dir / "efivars").mkdir()
    ok, reason = firmware_setup_support(efi_dir)
    assert not ok
    assert "efivarfs is not mounted" in reason
    assert "mount -t efivarfs" in reason


def test_supported_variable_missing(efi_dir: Path) -> None:
    ok, reason = firmware_setup_support(efi_dir)
    assert not ok
    assert reason.startswith("firmware does not offer boot-to-setup")
    assert "OsIndicationsSupported" in reason


def test_supported_variable_too_short(efi_dir: Path) -> None:
    (efi_dir / "efivars" / OS_INDICATIONS_SUPPORTED).write_bytes(b"\x06\x00\x00\x00\x01\x00")
    ok, reason = firmware_setup_support(efi_dir)
    assert not ok
    assert reason.startswith("firmware does not offer boot-to-setup")
    assert "6 bytes" in reason


def test_supported_bit_clear(efi_dir: Path) -> None:
    (efi_dir / "efivars" / OS_INDICATIONS_SUPPORTED).write_bytes(var_bytes(0x6, 6))
    ok, reason = firmware_setup_support(efi_dir)
    assert not ok
    assert reason.startswith("firmware does not offer boot-to-setup")
    assert "bit 0" in reason


def test_supported_variable_unreadable(efi_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (efi_dir / "efivars" / OS_INDICATIONS_SUPPORTED).write_bytes(var_bytes(0x1, 6))
    real_open = os.open

    def denied(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).endswith(OS_INDICATIONS_SUPPORTED):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", denied)
    ok, reason = firmware_setup_support(efi_dir)
    assert not ok
    assert "cannot read" in reason
    assert "Permission denied" in reason


# --- the real immutable flag (root: loop-mounted ext4) -------------------------------------


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def ext4_mount(tmp_path: Path) -> Iterator[Path]:
    """A fresh 16 MiB ext4 on a loop device: a filesystem with the immutable flag."""
    image = tmp_path / f"efivars-{uuid.uuid4().hex[:8]}.img"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with image.open("wb") as f:
        f.truncate(16 * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", str(image))
    loop = _run("losetup", "--find", "--show", str(image)).strip()
    mounted = False
    try:
        _run("mount", "-t", "ext4", loop, str(mountpoint))
        mounted = True
        yield mountpoint
    finally:
        try:
            if mounted:
                # A file left immutable does not stop an unmount, but clear it anyway so a
                # failed test leaves nothing odd behind if the image is inspected.
                subprocess.run(["chattr", "-R", "-i", str(mountpoint)], check=False)
                _run("umount", str(mountpoint))
        finally:
            _run("losetup", "--detach", loop)


def _lsattr_flags(path: Path) -> str:
    # "----i---------e------- /path": the flags column before the name.
    return _run("lsattr", str(path)).split()[0]


@pytest.mark.root
def test_immutable_variable_on_real_filesystem(tmp_path: Path) -> None:
    need_root()
    for name in ("mkfs.ext4", "chattr", "lsattr"):
        need_command(name, "e2fsprogs")
    need_command("losetup", "mount")
    with ext4_mount(tmp_path) as efivars:
        path = efivars / OS_INDICATIONS
        path.write_bytes(var_bytes(0x4))
        _run("chattr", "+i", str(path))
        assert "i" in _lsattr_flags(path)
        # The flag is real: even root cannot open the file for writing while it is set.
        with pytest.raises(PermissionError):
            path.open("r+b")

        result = request_firmware_setup(efivars)

        assert result == {"previous": 0x4, "value": 0x5, "written": True}
        assert path.read_bytes() == bytes.fromhex("07000000" + "0500000000000000")
        assert "i" in _lsattr_flags(path), "the immutable flag must be restored"

        # Not immutable before: not immutable after (only the original flags come back).
        plain = efivars / "second"
        plain.mkdir()
        target = plain / OS_INDICATIONS
        target.write_bytes(var_bytes(0))
        assert request_firmware_setup(plain)["written"] is True
        assert "i" not in _lsattr_flags(target)
        assert target.read_bytes() == var_bytes(1)
