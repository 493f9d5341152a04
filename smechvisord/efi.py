"""Ask the UEFI firmware to enter its setup screen at the next boot (POST /api/reboot-uefi).

The mechanism is the one `systemctl reboot --firmware-setup` uses (see
design/cloud-hypervisor.md 4.6): the firmware advertises the feature with bit 0 of
`OsIndicationsSupported`, and the OS requests it by setting bit 0 of `OsIndications`, both
variables of the EFI global vendor GUID, read and written through efivarfs. An efivarfs
file is a 4-byte little-endian attribute word followed by the variable's data.

This module only writes the request. Stopping VMs and running the reboot command are the
caller's (see smechvisord.hostcmd.run_reboot).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
from pathlib import Path
from typing import TypedDict

log = logging.getLogger(__name__)

EFI_GLOBAL_GUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
# EFI_OS_INDICATIONS_BOOT_TO_FW_UI
BOOT_TO_FW_UI = 0x1

OS_INDICATIONS = f"OsIndications-{EFI_GLOBAL_GUID}"
OS_INDICATIONS_SUPPORTED = f"OsIndicationsSupported-{EFI_GLOBAL_GUID}"

# NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS, what systemd writes: the request must
# survive the reboot (non-volatile) and be visible to the firmware at boot.
ATTRIBUTES = 0x00000007
_ATTR_BYTES = 4
_U64_BYTES = 8

# ioctl numbers in the asm-generic encoding (x86, arm, arm64, riscv):
# _IOR('f', 1, long) and _IOW('f', 2, long). The size field is sizeof(long) even though
# the kernel reads and writes an int, which is why the buffer below is 4 bytes.
_IOC_WRITE = 1
_IOC_READ = 2
_LONG = struct.calcsize("l")
FS_IOC_GETFLAGS = (_IOC_READ << 30) | (_LONG << 16) | (ord("f") << 8) | 1
FS_IOC_SETFLAGS = (_IOC_WRITE << 30) | (_LONG << 16) | (ord("f") << 8) | 2
FS_IMMUTABLE_FL = 0x00000010

# Errors that mean "this filesystem has no inode flags", not "you may not": then there is
# no immutable flag to clear either, and the write goes ahead without the ioctls.
_FLAGS_UNSUPPORTED = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})

# An EFI variable is at most a few KiB of NVRAM; the cap keeps a wrong sysroot (a FIFO, a
# huge file) from costing memory.
_READ_LIMIT = 64 * 1024

# efivarfs rate-limits reads by non-root users, and a rate-limited read can come back with
# EINTR. CPython retries EINTR itself (PEP 475), so these retries only matter when a signal
# handler raised; they are bounded and paced like systemd's so a storm cannot spin.
_READ_RETRIES = 10
_RETRY_PAUSE = 0.05


class EfiError(RuntimeError):
    """Reading or writing an EFI variable failed; the message says what to do."""


class FirmwareSetupRequest(TypedDict):
    previous: int
    value: int
    written: bool


def firmware_setup_support(efi_dir: Path) -> tuple[bool, str]:
    """Whether this node can be asked to boot into firmware setup, and why not.

    `efi_dir` is `<sysroot>/sys/firmware/efi`. Answers `(True, "")` or `(False, reason)`,
    the reason a sentence an operator can act on.
    """
    if not efi_dir.is_dir():
        return False, (
            f"the node booted in legacy BIOS mode ({efi_dir} does not exist): only a UEFI "
            "boot can request firmware setup; enter setup with the vendor key at power-on"
        )
    efivars = efi_dir / "efivars"
    try:
        mounted = efivars.is_dir() and any(efivars.iterdir())
    except OSError as exc:
        return False, f"cannot read {efivars}: {exc.strerror or exc}; run the daemon as root"
    if not mounted:
        # A mounted efivarfs always lists variables (Boot####, BootOrder, ...): an empty
        # directory is the mount point without the filesystem.
        return False, (
            f"efivarfs is not mounted at {efivars}: "
            f"mount it with `mount -t efivarfs efivarfs {efivars}`"
        )
    try:
        data = _read_var(efivars / OS_INDICATIONS_SUPPORTED)
    except EfiError as exc:
        return False, str(exc)
    if data is None:
        return False, (
            "firmware does not offer boot-to-setup (it publishes no OsIndicationsSupported "
            "variable); enter setup with the vendor key at power-on"
        )
    if len(data) < _ATTR_BYTES + _U64_BYTES:
        return False, (
            f"firmware does not offer boot-to-setup: OsIndicationsSupported holds "
            f"{len(data)} bytes, fewer than the {_ATTR_BYTES + _U64_BYTES} of an attribute "
            "word and a 64-bit value; enter setup with the vendor key at power-on"
        )
    supported = int.from_bytes(data[_ATTR_BYTES : _ATTR_BYTES + _U64_BYTES], "little")
    if not supported & BOOT_TO_FW_UI:
        return False, (
            "firmware does not offer boot-to-setup (OsIndicationsSupported bit 0, "
            "BOOT_TO_FW_UI, is clear); enter setup with the vendor key at power-on"
        )
    return True, ""


def request_firmware_setup(efivars_dir: Path) -> FirmwareSetupRequest:
    """Set bit 0 of OsIndications so the next boot enters firmware setup.

    Other bits of an existing value are kept. When the bit is already set nothing is
    written: each write costs NVRAM wear, and some firmware misbehaves on redundant writes
    (systemd skips them for the same reason).
    """
    if not efivars_dir.is_dir():
        raise EfiError(f"efivarfs is not mounted at {efivars_dir}: cannot request firmware setup")
    path = efivars_dir / OS_INDICATIONS
    data = _read_var(path)
    if data is None:
        # Absent means 0: firmware may delete the variable once it has acted on it.
        previous = 0
    elif len(data) != _ATTR_BYTES + _U64_BYTES:
        raise EfiError(
            f"{path} holds {len(data)} bytes, not the {_ATTR_BYTES + _U64_BYTES} of an "
            "attribute word and a 64-bit value; not overwriting a variable this daemon "
            "does not understand"
        )
    else:
        previous = int.from_bytes(data[_ATTR_BYTES:], "little")
    value = previous | BOOT_TO_FW_UI
    if value == previous:
        return {"previous": previous, "value": value, "written": False}
    payload = struct.pack("<IQ", ATTRIBUTES, value)
    if data is None:
        _create_var(path, payload)
    else:
        _rewrite_var(path, payload)
    return {"previous": previous, "value": value, "written": True}


def withdraw_firmware_setup(efivars_dir: Path, request: FirmwareSetupRequest) -> bool:
    """Undo `request_firmware_setup` when the reboot it was for did not happen: left set,
    the bit sends the node's next reboot, whenever and whyever it comes, into firmware
    setup, where a headless node waits for someone at its console. Only a value this
    daemon wrote is put back; True when it was."""
    if not request["written"]:
        return False
    path = efivars_dir / OS_INDICATIONS
    data = _read_var(path)
    if data is None or len(data) != _ATTR_BYTES + _U64_BYTES:
        return False
    if int.from_bytes(data[_ATTR_BYTES:], "little") != request["value"]:
        return False  # changed by someone else since: theirs to keep
    _rewrite_var(path, struct.pack("<IQ", ATTRIBUTES, request["previous"]))
    return True


def _read_var(path: Path) -> bytes | None:
    """The whole efivarfs file (attributes + data), or None when the variable is absent."""
    for attempt in range(_READ_RETRIES):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except InterruptedError:
            time.sleep(_RETRY_PAUSE * (attempt + 1))
            continue
        except OSError as exc:
            raise EfiError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = os.read(fd, 4096)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > _READ_LIMIT:
                    raise EfiError(f"{path} is over {_READ_LIMIT} bytes: not an EFI variable")
                chunks.append(chunk)
        except InterruptedError:
            # Start over: a variable must be read whole, not stitched from two reads.
            time.sleep(_RETRY_PAUSE * (attempt + 1))
        except OSError as exc:
            raise EfiError(f"cannot read {path}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
    raise EfiError(f"cannot read {path}: interrupted {_READ_RETRIES} times (rate-limited?)")


def _create_var(path: Path, payload: bytes) -> None:
    # O_EXCL: if the variable appeared since it was read as absent, its value may have bits
    # this write would drop; fail and let the caller try again rather than clobber it.
    # A new efivarfs file is marked immutable on creation, but the creating descriptor can
    # still write, so no flag handling is needed here.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError as exc:
        raise EfiError(f"{path} appeared while it was being written; try again") from exc
    except OSError as exc:
        raise EfiError(_write_failure(path, exc)) from exc
    try:
        _write_once(fd, path, payload)
    finally:
        os.close(fd)


def _rewrite_var(path: Path, payload: bytes) -> None:
    # efivarfs marks existing variables immutable (against deletion that could brick the
    # firmware): an open for writing fails with EPERM until the flag is cleared. Clear it
    # through a read-only descriptor (as `chattr -i` does), write, then put the original
    # flags back whatever happened, so the file is no less protected than before.
    try:
        ro = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise EfiError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        original = _get_flags(ro, path)
        cleared = False
        if original is not None and original & FS_IMMUTABLE_FL:
            cleared = _set_flags(ro, path, original & ~FS_IMMUTABLE_FL)
        try:
            # No O_TRUNC: efivarfs replaces the whole variable on each write, and the old
            # file was checked to be exactly as long as the payload.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                raise EfiError(_write_failure(path, exc)) from exc
            try:
                _write_once(fd, path, payload)
            finally:
                os.close(fd)
        finally:
            if cleared and original is not None:
                try:
                    _set_flags(ro, path, original)
                except (OSError, EfiError) as exc:
                    # The request is written (or the write's own error is on its way); a
                    # missing immutable flag only loses protection against `rm`, which is
                    # no reason to cancel the reboot. Say so in the log.
                    log.warning("could not restore the immutable flag on %s: %s", path, exc)
    finally:
        os.close(ro)


def _write_once(fd: int, path: Path, payload: bytes) -> None:
    # efivarfs takes the whole variable (attributes + data) in a single write() and sets
    # the variable from exactly that buffer, so the write cannot be split or retried in
    # pieces. A temp file and rename is impossible too: efivarfs has no rename, and the
    # file name is the variable's identity.
    try:
        written = os.write(fd, payload)
    except OSError as exc:
        raise EfiError(_write_failure(path, exc)) from exc
    if written != len(payload):
        raise EfiError(f"short write to {path}: {written} of {len(payload)} bytes")


def _get_flags(fd: int, path: Path) -> int | None:
    """The inode flags, or None when the filesystem has none."""
    try:
        raw = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(4))
    except OSError as exc:
        if exc.errno in _FLAGS_UNSUPPORTED:
            return None
        raise EfiError(f"cannot read the flags of {path}: {exc.strerror or exc}") from exc
    return int(struct.unpack("I", raw[:4])[0])


def _set_flags(fd: int, path: Path, flags: int) -> bool:
    """Set the inode flags; False when the filesystem has none (nothing was changed)."""
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("I", flags))
    except OSError as exc:
        if exc.errno in _FLAGS_UNSUPPORTED:
            return False
        if exc.errno == errno.EPERM:
            raise EfiError(
                f"cannot change the immutable flag of {path}: operation not permitted "
                "(needs root with CAP_LINUX_IMMUTABLE)"
            ) from exc
        raise EfiError(f"cannot change the flags of {path}: {exc.strerror or exc}") from exc
    return True


def _write_failure(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return (
            f"cannot write {path}: permission denied (the daemon must run as root; an "
            "immutable variable needs its flag cleared first)"
        )
    if exc.errno == errno.ENOSPC:
        return f"cannot write {path}: the firmware's variable store is full"
    if exc.errno in (errno.EINVAL, errno.EIO):
        return f"the firmware rejected the write to {path}: {exc.strerror or exc}"
    return f"cannot write {path}: {exc.strerror or exc}"
