"""The base system class (ota.md, "Base system class"): A/B root slots and a one-shot trial boot.

A new base image is written to the slot the node did not boot from, read back, and only
then named as GRUB's one-shot `next_entry`; the default (`saved_entry`) stays on the
running slot. The operator reboots when convenient, and `boot_check`, run early at boot,
either commits the new slot (default = new) or records a failed trial. Any reset before
the commit lands on the old default: there is no boot counter that could misfire.

Journal (state.json, component "base"), each phase written before the step it names:

    invalidating  clear a one-shot naming the slot, zero the slot's first MiB
    writing       blob -> sha256(blob) -> zstd decode, bounded by raw_size -> sha256(raw)
                  -> slot; each window is fdatasynced, read back and compared
    verifying     the held-back head written, fsync, BLKFLSBUF, head read back and compared
    staged        next_entry = the slot (exit 4)
    trial         booted into the staged slot; health checks run
    committed | trial_failed | rolled_back | discarded | failed

The first MiB of the image (where ext4, XFS, btrfs and FAT keep their superblocks) is held
in memory and written last, after the whole stream has matched both signed hashes. So
until the image is complete and verified the slot carries no mountable filesystem, and an
interrupted or refused write leaves it unbootable by construction; `recover` also zeroes
it again, because the head may already be on disk when a crash hits `verifying`.

Read-back. ota.md reads the whole slot back after the last fsync and hashes it again.
Here each window (16 MiB) is read back from the device right after its fdatasync, with
O_DIRECT, and compared byte for byte with the window the stream hash covered:
sha256(stream) == raw_sha256 and device == stream prove what sha256(device) == raw_sha256
proves, with one sha256 pass over the raw image instead of two. sha256 is the bottleneck
(about 300 MB/s on a core without SHA extensions), so the second pass doubled the time.
Decoding, hashing and writing run on three threads (see _Pipeline).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import queue
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

import zstandard

from spk_visor.errors import (
    BusyError,
    ConfigError,
    ExitCode,
    OperatorNeededError,
    RefusedError,
    VerificationError,
)
from spk_visor.ota import durable
from spk_visor.ota.context import OtaContext
from spk_visor.ota.journal import now_iso
from spk_visor.ota.manifest import ImageComponent, Manifest
from spk_visor.ota.nodeconf import Slots
from spk_visor.ota.store import hex_of

COMPONENT = "base"
SLOTS = ("a", "b")
CMDLINE_KEY = "smechvisor.slot"
MIB = 1 << 20
# Held back during the stream and written last; also what invalidation zeroes. Every
# filesystem a slot could hold keeps its superblock in here (ext4 at 1 KiB, btrfs at 64 KiB).
HEAD = MIB
# One window: decoded, hashed, written, fdatasynced, read back and compared as a unit.
# Large, so Python does little per byte and the device sees few flushes.
CHUNK = 16 * MIB
# Windows in flight between the decoder, the hasher and the writer.
WINDOWS = 3
# O_DIRECT offsets, lengths and buffers are multiples of this (512 B and 4 KiB sectors).
ALIGN = 4096
# How much of the encoded blob the decoder pulls per read.
READ_SIZE = 4 * MIB
# zstd's own default limit, stated so a frame cannot ask for more decoder memory.
MAX_WINDOW = 1 << 27
# linux/fs.h: _IO(0x12, 97), drop the block device's clean cached pages.
BLKFLSBUF = 0x1261
# Per health check; a check that hangs is a failed check.
HEALTH_TIMEOUT_S = 60.0
# Phases whose interruption means the slot holds unverified bytes.
PENDING = ("invalidating", "writing", "verifying")
_OUTPUT_TAIL = 400

# libc's memcmp compares two windows without copying them and without the GIL (a
# memoryview comparison goes element by element, 30 times slower).
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


# -- the bootloader ---------------------------------------------------------------------


class Bootloader(Protocol):
    """What the base class needs from a bootloader (ota.md keeps this interface tiny)."""

    def mark_bad(self, slot: str) -> bool:
        """Make sure nothing boots `slot` by itself; True if something changed."""

    def set_oneshot(self, slot: str) -> None:
        """Boot `slot` on the next boot only."""

    def set_default(self, slot: str) -> None:
        """Boot `slot` from now on, with no one-shot left pending."""

    def booted(self) -> str | None:
        """The slot this boot came from, None when it cannot be told."""

    def oneshot(self) -> str | None:
        """The slot a pending one-shot names, if any."""

    def default(self) -> str | None:
        """The slot booted by default, if it names one."""


@dataclass(frozen=True)
class GrubEnv:
    """GRUB: `next_entry` (one-shot, cleared by grub.cfg's save_env when it boots) and
    `saved_entry` (the default under GRUB_DEFAULT=saved) in the 1 KiB grubenv block.

    grub-editenv rewrites the file in place (truncate, then write), so a power cut in the
    middle could leave an empty environment. Every change is therefore made by
    grub-editenv on a copy, which is fsynced and renamed over grubenv.
    """

    slots: Slots
    cmdline: Path

    @property
    def path(self) -> Path:
        return Path(self.slots.grubenv)

    def _editenv(self, target: Path, *args: str) -> str:
        argv = [*self.slots.grub_editenv, str(target), *args]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        except FileNotFoundError:
            raise ConfigError(
                f"{argv[0]} not found", "install grub-common or set slots.grub_editenv"
            ) from None
        if done.returncode != 0:
            raise OperatorNeededError(
                f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace').strip()}",
                "check the grubenv file and the boot partition",
            )
        return done.stdout.decode(errors="replace")

    def env(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        out: dict[str, str] = {}
        for line in self._editenv(self.path, "list").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key] = value
        return out

    def _edit(self, *changes: list[str]) -> None:
        tmp = self.path.with_name(self.path.name + ".spk-visor.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
        for change in changes:
            self._editenv(tmp, *change)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        durable.fsync_dir(self.path.parent)

    def _slot_of(self, entry: str | None) -> str | None:
        for slot in SLOTS:
            if entry and entry == self.slots.entry(slot):
                return slot
        return None

    def mark_bad(self, slot: str) -> bool:
        if self.env().get("next_entry") != self.slots.entry(slot):
            return False
        self._edit(["unset", "next_entry"])
        return True

    def set_oneshot(self, slot: str) -> None:
        self._edit(["set", f"next_entry={self.slots.entry(slot)}"])

    def set_default(self, slot: str) -> None:
        self._edit(["set", f"saved_entry={self.slots.entry(slot)}"], ["unset", "next_entry"])

    def booted(self) -> str | None:
        try:
            words = self.cmdline.read_text().split()
        except OSError:
            return None
        for word in words:
            key, _, value = word.partition("=")
            if key == CMDLINE_KEY and value in SLOTS:
                return value
        return None

    def oneshot(self) -> str | None:
        return self._slot_of(self.env().get("next_entry"))

    def default(self) -> str | None:
        return self._slot_of(self.env().get("saved_entry"))


def bootloader(ctx: OtaContext) -> Bootloader:
    return GrubEnv(ctx.config.slots, ctx.paths.sysroot / "proc" / "cmdline")


def booted_slot(ctx: OtaContext) -> str | None:
    """The running slot, from `smechvisor.slot=a|b` on the kernel command line, else None."""
    return bootloader(ctx).booted()


def inactive_slot(ctx: OtaContext) -> str:
    """The slot an update may write: not the booted one (nor, failing that, the default)."""
    boot = bootloader(ctx)
    current = boot.booted() or boot.default()
    if current is None:
        raise ConfigError(
            f"cannot tell which slot is running: no {CMDLINE_KEY}= on the kernel command "
            "line and grubenv's saved_entry names neither slot",
            f"add {CMDLINE_KEY}=a|b to each slot's GRUB entry",
        )
    return other(current)


# -- the slot device --------------------------------------------------------------------


def _open_slot(device: str, flags: int) -> int:
    """Open a slot exclusively: the kernel refuses (EBUSY) while it is mounted or held."""
    try:
        return os.open(device, flags | os.O_EXCL | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"slot device {device} does not exist", "check [slots] in ota.conf"
        ) from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise VerificationError(
                f"slot device {device} is in use (mounted or held)", "unmount it first"
            ) from None
        raise


def _mounted(device: str) -> bool:
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return False
    if not stat.S_ISBLK(st.st_mode):
        return False
    want = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[2] == want for line in f if line.strip())


def _drop_cache(fd: int) -> None:
    """Make the next read come from the device, not from the pages just written."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    else:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset`; fewer bytes only at the end of the device."""
    n = 0
    while n < len(view):
        got = os.preadv(fd, [view[n:]], offset + n)
        if not got:
            break
        n += got
    return n


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _open_for_writing(device: str) -> tuple[int, bool]:
    """The slot opened exclusively for writing, with O_DIRECT where the device allows it
    (four times faster than through the page cache on a loop device here)."""
    try:
        return _open_slot(device, os.O_RDWR | os.O_DIRECT), True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return _open_slot(device, os.O_RDWR), False


def _wipe_head(device: str) -> None:
    """Zero the slot's first MiB, durably: no filesystem there any more."""
    fd = _open_slot(device, os.O_WRONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        _pwrite_all(fd, bytes(min(HEAD, size)), 0)
        os.fsync(fd)
        _drop_cache(fd)
    finally:
        os.close(fd)


def _hash_fd(fd: int, size: int) -> tuple[str, int]:
    """sha256 of the first `size` bytes of `fd`, and how many bytes there were."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    pos = 0
    while pos < size:
        n = os.preadv(fd, [view[: min(CHUNK, size - pos)]], pos)
        if n == 0:
            break
        digest.update(view[:n])
        pos += n
    return digest.hexdigest(), pos


def verify_installed(ctx: OtaContext, image: ImageComponent, slot: str) -> list[str]:
    """Re-hash a slot against its image; [] when it holds exactly those bytes.

    A slot mounted read-write no longer matches (ext4 updates its superblock on mount);
    root slots are meant to be mounted read-only.
    """
    device = ctx.config.slots.device(slot)
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return [f"slot {slot}: cannot open {device}: {e.strerror}"]
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < image.raw_size:
            return [f"slot {slot}: {device} has {size} bytes, the image {image.raw_size}"]
        got, _n = _hash_fd(fd, image.raw_size)
    finally:
        os.close(fd)
    if got != image.raw_sha256:
        return [
            f"slot {slot}: content sha256 {got[:12]}… is not the image's {image.raw_sha256[:12]}…"
        ]
    return []


# -- writing ----------------------------------------------------------------------------


class _HashingReader:
    """A file that hashes every byte read from it (the decoder pulls through this)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.digest.update(data)
        self.count += len(data)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        n = self._f.readinto(buf)  # type: ignore[attr-defined]
        if n:
            self.digest.update(memoryview(buf)[:n])
            self.count += n
        return int(n or 0)

    def drain(self) -> None:
        """Hash the rest of the file: bytes the decoder never asked for count too."""
        while self.read(CHUNK):
            pass


def _blob_mismatch(source: _HashingReader, image: ImageComponent, size: int) -> str | None:
    if source.count != size:
        return f"base image blob has {source.count} bytes, its signed size is {size}"
    got = source.digest.hexdigest()
    if got != hex_of(image.blob):
        return f"base image blob does not match its signed hash (got {got[:12]}…)"
    return None


def _refuse(what: str) -> VerificationError:
    return VerificationError(
        what, "the stored blob or the release is corrupt; the slot was left unbootable"
    )


class _Buffer:
    """Page-aligned memory (O_DIRECT wants it), and its address for memcmp."""

    def __init__(self, size: int) -> None:
        self.mem = mmap.mmap(-1, size)
        self.view = memoryview(self.mem)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))


@dataclass
class _Piece:
    """Decoded bytes on their way to the hasher and, for the body, the writer."""

    view: memoryview
    offset: int
    buf: _Buffer | None = None  # a window to recycle; None for the held-back head and tail
    users: int = 1


class _Pipeline:
    """Hash and write decoded windows on two threads while the caller decodes the next.

    hashlib, zstd and the I/O calls all release the GIL, so decoding, hashing and writing
    run on separate cores. The writer writes each window, fdatasyncs, reads it back from
    the device (O_DIRECT, or with the range evicted from the page cache) and compares it
    byte for byte with the window. Together with sha256(window stream) == raw_sha256 that
    proves what a second full read-and-hash pass would, at a memcmp's cost.
    """

    def __init__(self, fd: int, raw_size: int, direct: bool) -> None:
        self.fd = fd
        self.raw_size = raw_size
        self.direct = direct
        self.digest = hashlib.sha256()
        self.written = 0
        self.errors: list[BaseException] = []
        self.cancelled = False
        self._lock = threading.Lock()
        self._free: queue.Queue[_Buffer] = queue.Queue()
        for _ in range(WINDOWS):
            self._free.put(_Buffer(CHUNK))
        self._check = _Buffer(CHUNK)
        self._to_hash: queue.Queue[_Piece | None] = queue.Queue()
        self._to_write: queue.Queue[_Piece | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._hasher, name="slot-hash", daemon=True),
            threading.Thread(target=self._writer, name="slot-write", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _done(self, piece: _Piece) -> None:
        with self._lock:
            piece.users -= 1
            last = piece.users == 0
        if last and piece.buf is not None:
            self._free.put(piece.buf)

    def _hasher(self) -> None:
        self._drain(self._to_hash, lambda piece: self.digest.update(piece.view))

    def _writer(self) -> None:
        self._drain(self._to_write, self._write_verified)

    def _drain(self, q: queue.Queue[_Piece | None], work: Callable[[_Piece], None]) -> None:
        # After an error (or a cancel) it keeps taking pieces without working on them, so
        # every buffer comes back and the decoder never waits forever for one.
        while (piece := q.get()) is not None:
            try:
                if not self.errors and not self.cancelled:
                    work(piece)
            except BaseException as e:
                self.errors.append(e)
            finally:
                self._done(piece)

    def _write_verified(self, piece: _Piece) -> None:
        if piece.buf is None:
            raise RuntimeError("only windows go to the writer")
        n = len(piece.view)
        _pwrite_all(self.fd, piece.view, piece.offset)
        os.fdatasync(self.fd)
        if not self.direct:
            os.posix_fadvise(self.fd, piece.offset, n, os.POSIX_FADV_DONTNEED)
        got = _pread_into(self.fd, self._check.view[:n], piece.offset)
        if got != n or _memcmp(piece.buf.addr, self._check.addr, n) != 0:
            raise VerificationError(
                f"the slot reads back other bytes than were written at offset {piece.offset}",
                "the slot device may be failing; the slot was left unbootable",
            )
        before = self.written
        self.written += n
        if before * 2 < self.raw_size <= self.written * 2:
            durable.crash_point("base:mid-write")

    def take(self) -> _Buffer:
        return self._free.get()

    def submit(self, piece: _Piece, write: bool) -> None:
        if self.errors:
            if piece.buf is not None:
                self._free.put(piece.buf)
            raise self.errors[0]
        piece.users = 2 if write else 1
        self._to_hash.put(piece)
        if write:
            self._to_write.put(piece)

    def close(self) -> None:
        self._to_hash.put(None)
        self._to_write.put(None)
        for t in self._threads:
            t.join()


def _stream(
    ctx: OtaContext, image: ImageComponent, blob: Path, blob_size: int, fd: int, direct: bool
) -> tuple[bytes, bytes]:
    """Decode the blob into the slot, except its head and unaligned tail, which it returns.

    Raises VerificationError unless the blob matched its signed hash and size, the decoded
    stream is exactly raw_size bytes with sha256 raw_sha256, and every written window read
    back identical.
    """
    raw_size = image.raw_size
    head_len = min(HEAD, raw_size)
    body_end = head_len + (raw_size - head_len) // ALIGN * ALIGN
    with blob.open("rb", buffering=0) as f:
        source = _HashingReader(f)
        reader: Any = source
        if image.encoding == "zstd":
            dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
            reader = dctx.stream_reader(
                cast("BinaryIO", source),
                read_size=READ_SIZE,
                read_across_frames=True,
                closefd=False,
            )

        def fill(view: memoryview) -> int:
            n = 0
            while n < len(view):
                try:
                    got = reader.readinto(view[n:])
                except zstandard.ZstdError as e:
                    source.drain()
                    mismatch = _blob_mismatch(source, image, blob_size)
                    raise _refuse(mismatch or f"base image does not decode: {e}") from None
                if not got:
                    break
                n += got
            return n

        pipe = _Pipeline(fd, raw_size, direct)
        try:
            head = bytearray(head_len)
            decoded = fill(memoryview(head))
            pipe.submit(_Piece(memoryview(head)[:decoded], 0), write=False)
            while decoded < body_end and decoded % ALIGN == 0:
                buf = pipe.take()
                want = min(CHUNK, body_end - decoded)
                n = fill(buf.view[:want])
                # A short window means a short stream, refused below; it is not written.
                pipe.submit(_Piece(buf.view[:n], decoded, buf), write=n == want)
                decoded += n
                ctx.emit("progress", {"phase": "write", "bytes": pipe.written, "total": raw_size})
                if n < want:
                    break
            tail = bytearray(raw_size - body_end if decoded == body_end else 0)
            n = fill(memoryview(tail))
            pipe.submit(_Piece(memoryview(tail)[:n], decoded), write=False)
            decoded += n
            if decoded == raw_size and fill(memoryview(bytearray(1))):
                source.drain()
                raise _refuse(
                    _blob_mismatch(source, image, blob_size)
                    or f"base image decodes to more than its signed raw_size {raw_size}"
                )
            source.drain()
        except BaseException:
            pipe.cancelled = True  # nothing more gets written
            raise
        finally:
            pipe.close()
        if pipe.errors:
            raise pipe.errors[0]
    problem = _blob_mismatch(source, image, blob_size)
    if problem is None and decoded != raw_size:
        problem = f"base image decodes to {decoded} bytes, its signed raw_size is {raw_size}"
    if problem is None and pipe.digest.hexdigest() != image.raw_sha256:
        problem = "decoded base image does not match its signed raw_sha256"
    if problem:
        raise _refuse(problem)
    return bytes(head), bytes(tail)


def _set(ctx: OtaContext, phase: str, **fields: Any) -> dict[str, Any]:
    entry = ctx.journal.set(COMPONENT, phase, **fields)
    ctx.emit("phase", {"component": COMPONENT, "phase": phase})
    return entry


def _check_target(ctx: OtaContext, boot: Bootloader, slot: str, raw_size: int) -> str:
    """Refuse, before anything is written, to touch a slot that may be in use."""
    slots = ctx.config.slots
    if os.path.realpath(slots.a) == os.path.realpath(slots.b):
        raise ConfigError(f"slots a and b are the same device {slots.a}", "fix [slots] in ota.conf")
    device = slots.device(slot)
    if boot.booted() == slot:
        raise VerificationError(f"slot {slot} is the booted slot", "nothing was changed")
    if boot.default() == slot:
        raise VerificationError(
            f"slot {slot} is the default boot slot, but the node runs slot {other(slot)}",
            "reboot into the default slot first (a failed trial is still running?)",
        )
    if _mounted(device):
        raise VerificationError(f"slot device {device} is mounted", "unmount it first")
    fd = _open_slot(device, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size < raw_size:
        raise VerificationError(
            f"the base image ({raw_size} bytes) does not fit slot {slot} ({size} bytes)",
            "the release is built for larger slots",
        )
    return device


def _mark_bad(ctx: OtaContext, boot: Bootloader, slot: str) -> list[str]:
    """Clear a one-shot naming `slot`; zero its head unless it is running or the default."""
    done = []
    if boot.mark_bad(slot):
        done.append(f"cleared the one-shot boot of slot {slot}")
    if slot in (boot.booted(), boot.default()):
        return done
    device = ctx.config.slots.device(slot)
    try:
        _wipe_head(device)
        done.append(f"zeroed the first MiB of {device}")
    except (OSError, ConfigError, VerificationError) as e:
        # The one-shot is gone, so the slot cannot be booted by itself either way.
        ctx.log(f"could not zero the head of {device}: {e}")
    return done


def stage(ctx: OtaContext, manifest: Manifest, manifest_hex: str) -> ExitCode:
    """Write the manifest's base image to the inactive slot and make it the next boot."""
    image = manifest.image
    if image is None:
        raise VerificationError("the manifest carries no base image", "nothing was changed")
    blob_size = manifest.blobs[image.blob]
    if not ctx.store.has(image.blob, blob_size):
        raise RefusedError(
            f"base image blob {image.blob[:19]}… is not in the store", "fetch it first"
        )
    boot = bootloader(ctx)
    prior = ctx.journal.get(COMPONENT)
    phase = str(prior.get("phase", "idle"))
    if phase == "trial" or (phase == "staged" and boot.booted() == prior.get("slot")):
        raise VerificationError(
            "a trial boot of a new base is in progress", "let boot-check commit or reject it"
        )
    slot = inactive_slot(ctx)
    same = prior.get("manifest") == manifest_hex and prior.get("slot") == slot
    if phase == "staged" and same and boot.oneshot() == slot:
        # A pull from cron meets the release it staged last time: do not rewrite it.
        ctx.log(f"base {image.version} is already staged in slot {slot}; reboot to try it")
        return ExitCode.REBOOT_REQUIRED
    device = _check_target(ctx, boot, slot, image.raw_size)
    fields = {
        "slot": slot,
        "device": device,
        "entry": ctx.config.slots.entry(slot),
        "from_slot": other(slot),
        "manifest": manifest_hex,
        "version": image.version,
        "release": manifest.release.version,
        "counter": manifest.release.counter,
        "set_floor": manifest.release.set_floor,
        "blob": image.blob,
        "encoding": image.encoding,
        "raw_size": image.raw_size,
        "raw_sha256": image.raw_sha256,
        "reason": None,
    }
    if phase == "fetching":
        _set(ctx, "invalidating", **fields)
    else:
        ctx.journal.begin(COMPONENT, "invalidating", **fields)
        ctx.emit("phase", {"component": COMPONENT, "phase": "invalidating"})
    try:
        _mark_bad(ctx, boot, slot)
        _set(ctx, "writing")
        fd, direct = _open_for_writing(device)
        try:
            head, tail = _stream(ctx, image, ctx.store.path(image.blob), blob_size, fd, direct)
            os.fsync(fd)
            if direct:  # head and tail sit in ordinary memory, the tail has any length
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            tail_at = image.raw_size - len(tail)
            _pwrite_all(fd, tail, tail_at)
            _pwrite_all(fd, head, 0)
            ctx.emit(
                "progress", {"phase": "write", "bytes": image.raw_size, "total": image.raw_size}
            )
            _set(ctx, "verifying")
            os.fsync(fd)
            _drop_cache(fd)
            for data, at in ((head, 0), (tail, tail_at)):
                back = bytearray(len(data))
                if _pread_into(fd, memoryview(back), at) != len(data) or back != data:
                    raise VerificationError(
                        f"slot {slot} reads back other bytes than were written at offset {at}",
                        "the slot device may be failing; the slot was left unbootable",
                    )
            ctx.emit(
                "progress", {"phase": "verify", "bytes": image.raw_size, "total": image.raw_size}
            )
        finally:
            os.close(fd)
        boot.set_oneshot(slot)
        durable.crash_point("base:oneshot-set")
    except BaseException as e:
        reason = e.message if isinstance(e, VerificationError) else f"{type(e).__name__}: {e}"
        with contextlib.suppress(Exception):
            _mark_bad(ctx, boot, slot)
        _set(ctx, "failed", reason=reason)
        ctx.history.append("base.failed", slot=slot, manifest=manifest_hex, reason=reason)
        raise
    _set(ctx, "staged", staged=now_iso())
    ctx.history.append(
        "base.staged",
        slot=slot,
        manifest=manifest_hex,
        version=image.version,
        raw_sha256=image.raw_sha256,
    )
    ctx.log(f"base {image.version} staged in slot {slot}; reboot to try it")
    return ExitCode.REBOOT_REQUIRED


# -- boot check -------------------------------------------------------------------------


def _run_check(path: Path, slot: str, timeout: float) -> str | None:
    """Run one health check; None when it passed, else why not."""
    env = {**os.environ, "SPK_VISOR_OTA_SLOT": slot}
    with tempfile.TemporaryFile() as out:
        try:
            # Own session, so a check's children die with it on a timeout.
            proc = subprocess.Popen(
                [str(path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            return f"cannot run: {e.strerror}"
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {timeout:g} s"
        if rc == 0:
            return None
        out.seek(0)
        tail = out.read()[-_OUTPUT_TAIL:].decode(errors="replace").strip()
        return f"exit {rc}" + (f": {tail}" if tail else "")


def run_health_checks(
    ctx: OtaContext, slot: str, kind: str = "required", timeout: float | None = None
) -> list[str]:
    """Run the executables in health.d/<kind>/ in name order; one line per failure."""
    directory = ctx.paths.health_d / kind
    if not directory.is_dir():
        return []
    failures = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not os.access(path, os.X_OK):
            continue
        problem = _run_check(path, slot, HEALTH_TIMEOUT_S if timeout is None else timeout)
        if problem:
            failures.append(f"{kind}/{path.name}: {problem}")
    return failures


def _commit(ctx: OtaContext, boot: Bootloader, entry: dict[str, Any]) -> ExitCode:
    slot = str(entry["slot"])
    # Recorded first, so a crash from here on rolls the commit forward, not back.
    _set(ctx, "trial", committing=True)
    boot.set_default(slot)
    durable.crash_point("base:default-set")
    ctx.installed.record(
        COMPONENT,
        {
            "slot": slot,
            "manifest": entry.get("manifest"),
            "raw_sha256": entry.get("raw_sha256"),
            "raw_size": entry.get("raw_size"),
            "blob": entry.get("blob"),
            "version": entry.get("version"),
        },
        str(entry.get("manifest", "")),
        int(entry.get("counter", 0) or 0),
        str(entry.get("release") or entry.get("version") or ""),
    )
    ctx.floor.raise_to(int(entry.get("set_floor", 0) or 0))
    _set(ctx, "committed", committed=now_iso())
    ctx.history.append(
        "base.committed", slot=slot, manifest=entry.get("manifest"), version=entry.get("version")
    )
    ctx.log(f"base {entry.get('version')} committed: slot {slot} is the default now")
    return ExitCode.OK


def _trial_failed(
    ctx: OtaContext, boot: Bootloader, entry: dict[str, Any], reason: str, failures: list[str]
) -> None:
    slot = str(entry.get("slot"))
    _set(ctx, "trial_failed", reason=reason, failures=failures)
    # Normally grub.cfg consumed it already; make sure the failed slot is not retried.
    boot.mark_bad(slot)
    ctx.history.append(
        "base.trial_failed",
        slot=slot,
        manifest=entry.get("manifest"),
        reason=reason,
        failures=failures,
    )


def boot_check(ctx: OtaContext, health: Callable[[], list[str]] | None = None) -> ExitCode:
    """Early at boot: judge a trial boot of a staged base, or notice that it never ran.

    Returns OK when nothing is pending, when the trial committed, and when the trial
    boot was lost (a reset landed on the old default: journal rolled_back, no reboot
    needed). Returns ROLLED_BACK when this boot is a failed trial: the default still
    names the old slot, and the caller reboots into it.
    """
    entry = ctx.journal.get(COMPONENT)
    phase = entry.get("phase")
    if phase not in ("staged", "trial"):
        return ExitCode.OK
    boot = bootloader(ctx)
    slot = str(entry.get("slot"))
    booted = boot.booted()
    if booted == slot:
        if phase == "trial" and entry.get("committing"):
            return _commit(ctx, boot, entry)
        if phase == "trial":
            # A boot-check of this same boot died during the trial: a trial that did not
            # finish is a failed trial.
            _trial_failed(ctx, boot, entry, "interrupted: the trial did not finish", [])
            return ExitCode.ROLLED_BACK
        _set(ctx, "trial", trial_started=now_iso())
        failures = run_health_checks(ctx, slot)
        if health is not None:
            try:
                failures += health()
            except Exception as e:  # a crashing check is a failing check
                failures.append(f"health: {type(e).__name__}: {e}")
        for problem in run_health_checks(ctx, slot, "wanted"):
            ctx.log(f"wanted health check failed (not fatal): {problem}")
        if failures:
            _trial_failed(ctx, boot, entry, "health checks failed", failures)
            ctx.log("trial boot failed: " + "; ".join(failures))
            return ExitCode.ROLLED_BACK
        return _commit(ctx, boot, entry)
    if phase == "staged" and boot.oneshot() == slot:
        return ExitCode.OK  # staged, not rebooted yet
    reason = f"interrupted: booted slot {booted or 'unknown'}, not the staged slot {slot}"
    _trial_failed(ctx, boot, entry, reason, [])
    _set(ctx, "rolled_back")
    ctx.history.append("base.rolled_back", slot=slot, manifest=entry.get("manifest"), reason=reason)
    ctx.log(f"base trial of slot {slot} did not complete; running slot {booted}")
    return ExitCode.OK


# -- discard and recovery ---------------------------------------------------------------


def discard(ctx: OtaContext) -> ExitCode:
    """Cancel a staged base: no one-shot boot any more, journal discarded."""
    phase = ctx.journal.phase(COMPONENT)
    if phase in PENDING:
        recover(ctx)
        return ExitCode.OK
    if phase == "trial":
        raise BusyError("a trial boot of the base is in progress", "boot-check decides it")
    if phase != "staged":
        ctx.log("no staged base to discard")
        return ExitCode.OK
    entry = ctx.journal.get(COMPONENT)
    slot = str(entry.get("slot"))
    bootloader(ctx).mark_bad(slot)
    _set(ctx, "discarded", reason="discarded by the operator")
    ctx.history.append("base.discarded", slot=slot, manifest=entry.get("manifest"))
    return ExitCode.OK


def recover(ctx: OtaContext) -> list[str]:
    """Finish what an interrupted stage left; returns what was done ([] when nothing).

    invalidating/writing/verifying: the slot holds unverified bytes, so no one-shot may
    name it and its head is zeroed again; the journal says failed (interrupted). With no
    base staged, a one-shot naming a slot is unverified by definition and is cleared.
    staged and trial are left to boot_check, which can tell whether a reboot happened.
    """
    entry = ctx.journal.get(COMPONENT)
    phase = str(entry.get("phase", "idle"))
    boot = bootloader(ctx)
    if phase in PENDING:
        slot = entry.get("slot")
        done = _mark_bad(ctx, boot, slot) if slot in SLOTS else []
        reason = f"interrupted while {phase}"
        _set(ctx, "failed", reason=reason, interrupted=True)
        ctx.history.append("base.failed", slot=slot, manifest=entry.get("manifest"), reason=reason)
        return [f"base: {reason}; slot {slot} left unbootable", *done]
    if phase in ("staged", "trial"):
        return []
    stray = boot.oneshot()
    if stray is not None and boot.mark_bad(stray):
        ctx.history.append("base.oneshot_cleared", slot=stray, phase=phase)
        return [f"base: cleared a one-shot boot of slot {stray} that no staged base backs"]
    return []
