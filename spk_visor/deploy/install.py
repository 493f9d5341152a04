"""Plan validation and the install to disk (deploy.md, "What the receiver does on the disk").

`validate_plan` touches nothing: it resolves the disk by serial and size, checks the wipe
confirmation, verifies the manifest's signatures against the trust root baked into the
shim and works out the layout. `Installer` then does, in this order and never otherwise:

    prepare   wipe old boot code and both GPT copies, write the `ab` GPT, make the ESP
              (mkfs.vfat, written later with mtools: no vfat mount needed) and the data
              filesystem, mount data
    receive   one sink per blob: the base image streams (zstd-decoded) straight into
              root-a, its first MiB held back until both signed hashes match, then read
              back; the daemon pack is staged, checked, and unpacked file by file
              (each file's sha256 against the manifest) under opt/smechvisord/releases/<id>
    finalize  node config on the data partition (fstab by UUID, hostname, deploy record),
              grub.cfg + grubenv, then the bootloader LAST (BIOS, then the EFI fallback)
    abort     boot code removed, slot A's head zeroed, data unmounted: firmware falls
              through to the next boot device rather than into a half-written system

Node configuration lives on the data partition, not in slot A: slot A holds the signed
image byte for byte (its hash is read back), and OTA later writes a fresh image to slot B,
which would not carry anything the installer added. The installed system mounts the data
partition at DATA_MOUNT and bind-mounts boot/, opt/smechvisord/ and var/lib/ from it
(the fstab below); the base image is expected to use `<data>/etc/fstab`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

import zstandard

from spk_visor.deploy import bootloader, tools
from spk_visor.deploy.inventory import Disk
from spk_visor.errors import VerificationError
from spk_visor.ota import dsse, durable, swap
from spk_visor.ota.manifest import DaemonComponent, ImageComponent, Manifest
from spk_visor.ota.roots import Root
from spk_visor.ota.verify import Verified, verify_manifest

MIB = 1 << 20
GIB = 1 << 30
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
PART_NAMES = ("bios_grub", "esp", "root-a", "root-b", "data")
BIOS_MIB = 1
ESP_MIB = 512
# 1 MiB alignment gap in front of partition 1, 1 MiB for the backup GPT at the end.
FRAME_MIB = 2
# Slots grow up to this on big disks; on small ones they shrink to what the image needs.
DEFAULT_SLOT_BYTES = 16 * GIB
# The data partition must hold the daemon pack twice (staged + unpacked) plus this.
DATA_MIN_BYTES = 256 * MIB
SECTOR_SIZES = (512, 4096)
DATA_MOUNT = "/data"
DATA_LABEL = "spk-data"
# Held back while the image streams and written last (slots.py does the same): every
# filesystem keeps its superblock in here, so an unfinished slot A has no mountable fs.
HEAD = MIB
SYNC_EVERY = 64 * MIB
READ_CHUNK = 4 * MIB
HASH_IN_FLIGHT = 16  # chunks queued for the hash thread before the stream waits
MAX_WINDOW = 1 << 27  # zstd's default decoder window limit, stated explicitly
BLKFLSBUF = 0x1261
PLAN_KEYS = {"manifest", "disk", "layout", "hostname", "confirm_wipe_serial"}
DISK_KEYS = {"serial", "size"}
# \Z, not $: `$` also matches before a final newline, which would reach /etc/hostname.
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z"
)
MAX_PATH = 1024
MAX_COMPONENT = 255
_TIMEOUT_S = 600
APPEAR_TIMEOUT_S = 10.0

Emit = Callable[[str, dict[str, Any]], None]


class PlanRefused(Exception):
    """A PLAN the receiver will not act on; `reason` is machine-readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InstallError(Exception):
    """A step of the install failed; the caller must `abort`. `reason` is machine-readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---- layout ---------------------------------------------------------------------------


def _mib_up(n: int) -> int:
    return -(-n // MIB)


@dataclass(frozen=True)
class Layout:
    """Partition sizes of the `ab` profile, in MiB; data takes the rest of the disk."""

    slot_mib: int
    data_min_mib: int

    @property
    def fixed_mib(self) -> int:
        return FRAME_MIB + BIOS_MIB + ESP_MIB + 2 * self.slot_mib

    def sfdisk_script(self, partuuids: dict[str, str]) -> str:
        sizes = {"bios_grub": BIOS_MIB, "esp": ESP_MIB, "root-a": self.slot_mib}
        sizes["root-b"] = self.slot_mib
        types = {"bios_grub": BIOS_BOOT_TYPE, "esp": "U"}
        lines = ["label: gpt"]
        for name in PART_NAMES:
            size = f"size={sizes[name]}MiB, " if name in sizes else ""
            lines.append(
                f'{size}type={types.get(name, "L")}, name="{name}", uuid={partuuids[name]}'
            )
        return "\n".join(lines) + "\n"


def plan_layout(disk_size: int, image_raw: int, pack_size: int) -> Layout:
    """Sizes for a disk, or PlanRefused("disk_too_small") when image + data do not fit."""
    need_slot = max(_mib_up(image_raw), 1)
    data_min = _mib_up(DATA_MIN_BYTES + 2 * pack_size)
    disk_mib = disk_size // MIB
    spare = disk_mib - FRAME_MIB - BIOS_MIB - ESP_MIB - data_min
    if spare < 2 * need_slot:
        need = (FRAME_MIB + BIOS_MIB + ESP_MIB + data_min + 2 * need_slot) * MIB
        raise PlanRefused(
            "disk_too_small", f"the layout needs {need} bytes, the disk has {disk_size}"
        )
    # A quarter of what is left for each slot (half for data), within [image, default].
    slot = max(need_slot, min(DEFAULT_SLOT_BYTES // MIB, spare // 4))
    return Layout(slot_mib=slot, data_min_mib=data_min)


# ---- plan validation ------------------------------------------------------------------


@dataclass
class ResolvedPlan:
    disk: Disk
    verified: Verified
    manifest_raw: bytes
    layout: Layout
    hostname: str
    wipe_confirmed: bool

    @property
    def manifest(self) -> Manifest:
        return self.verified.manifest

    @property
    def manifest_sha256(self) -> str:
        return self.verified.sha256


def _check_names(parsed: Manifest) -> None:
    """Lengths on top of manifest.parse's character allow-list and `..`/absolute checks."""
    names: list[str] = []
    if parsed.daemon is not None:
        names += [f.path for f in parsed.daemon.files] + [s.path for s in parsed.daemon.symlinks]
        names += [s.target for s in parsed.daemon.symlinks]
    for name in names:
        if len(name) > MAX_PATH or any(len(p) > MAX_COMPONENT for p in name.split("/")):
            raise PlanRefused("bad_manifest", f"name too long: {name[:64]!r}...")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            raise PlanRefused("bad_manifest", f"control character in {name!r}")


def _resolve_disk(doc: Any, disks: list[Disk]) -> Disk:
    if not isinstance(doc, dict) or set(doc) != DISK_KEYS:
        raise PlanRefused("bad_plan", f"disk must have exactly the keys {sorted(DISK_KEYS)}")
    serial, size = doc["serial"], doc["size"]
    if not isinstance(serial, str) or not serial or not isinstance(size, int):
        raise PlanRefused("bad_plan", "disk.serial must be a string, disk.size an integer")
    matches = [d for d in disks if d.serial == serial and d.size == size]
    if not matches:
        raise PlanRefused("disk_not_found", f"no disk with serial {serial!r} and size {size}")
    if len(matches) > 1:
        raise PlanRefused("disk_ambiguous", f"{len(matches)} disks match serial {serial!r}")
    disk = matches[0]
    # The specific reasons first: they are what the donor operator can act on.
    for flag, reason in (
        (disk.boot_medium, "boot_medium"),
        (disk.mounted, "disk_mounted"),
        (disk.read_only, "disk_read_only"),
    ):
        if flag:
            raise PlanRefused(reason, f"disk {serial!r}")
    if disk.logical_sector not in SECTOR_SIZES:
        raise PlanRefused("sector_size", f"logical sector size {disk.logical_sector}")
    if not disk.eligible:
        raise PlanRefused("disk_not_eligible", ", ".join(disk.reasons))
    return disk


def validate_plan(
    plan: dict[str, Any],
    disks: list[Disk],
    trust_root: Root,
    *,
    now: dt.datetime | None = None,
) -> ResolvedPlan:
    """Everything about a PLAN that can be checked before touching the disk."""
    if not isinstance(plan, dict):
        raise PlanRefused("bad_plan", "PLAN is not an object")
    unknown = set(plan) - PLAN_KEYS
    if unknown:
        raise PlanRefused("bad_plan", f"unknown keys {sorted(unknown)}")
    missing = {"manifest", "disk", "layout", "hostname"} - set(plan)
    if missing:
        raise PlanRefused("bad_plan", f"missing keys {sorted(missing)}")
    if plan["layout"] != "ab":
        raise PlanRefused("unsupported_layout", f"layout {plan['layout']!r} (only 'ab')")
    hostname = plan["hostname"]
    if not isinstance(hostname, str) or not HOSTNAME_RE.match(hostname):
        raise PlanRefused("bad_hostname", repr(hostname)[:80])
    disk = _resolve_disk(plan["disk"], disks)
    confirm = plan.get("confirm_wipe_serial")
    if confirm is not None and confirm != disk.serial:
        raise PlanRefused("wipe_not_confirmed", "the confirmed serial is not the plan's disk")
    if disk.has_signatures and confirm != disk.serial:
        raise PlanRefused(
            "wipe_not_confirmed", f"disk {disk.serial!r} holds data; confirm its serial to wipe"
        )
    try:
        env = dsse.from_doc(plan["manifest"], dsse.MANIFEST_TYPE)
    except (VerificationError, ValueError, TypeError, KeyError) as e:
        raise PlanRefused("bad_manifest", str(e)) from e
    try:
        dsse.verify(env, trust_root.role("release"), "manifest")
    except VerificationError as e:
        raise PlanRefused("bad_signature", str(e)) from e
    try:
        verified = verify_manifest(env, trust_root, start=now or dt.datetime.now(dt.UTC))
    except VerificationError as e:
        raise PlanRefused("bad_manifest", str(e)) from e
    parsed = verified.manifest
    if parsed.image is None:
        raise PlanRefused("bad_manifest", "the release has no base image to install")
    _check_names(parsed)
    pack_size = parsed.blobs[parsed.daemon.pack] if parsed.daemon else 0
    layout = plan_layout(disk.size, parsed.image.raw_size, pack_size)
    return ResolvedPlan(disk, verified, env.to_bytes(), layout, hostname, confirm is not None)


# ---- running tools --------------------------------------------------------------------


def _run(argv: list[str], reason: str, stdin: str | None = None) -> str:
    return tools.run_checked(
        argv, lambda detail: InstallError(reason, detail), timeout=_TIMEOUT_S, stdin=stdin
    )


def _try(argv: list[str]) -> bool:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _part_name(disk_name: str, index: int) -> str:
    # sda -> sda1; nvme0n1, loop3, mmcblk0 -> nvme0n1p1, loop3p1, mmcblk0p1
    return f"{disk_name}{'p' if disk_name[-1].isdigit() else ''}{index}"


def _flush_device(fd: int) -> None:
    """fsync, then drop the device's cached pages so the next read comes from the media."""
    os.fsync(fd)
    try:
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    except OSError:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# ---- sinks ----------------------------------------------------------------------------


class BlobSink(Protocol):
    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


# The largest piece of decoded image handed on at once (see _ImageSink.__init__).
DECODE_PIECE = 4 << 20


class _RawSink:
    """What the zstd writer writes decoded bytes to: the image sink's raw path."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def write(self, data: bytes) -> int:
        self.sink._raw(bytes(data))
        return len(data)


class _ImageSink:
    """The base image, decoded on the fly into root-a, then read back and hashed again."""

    def __init__(self, inst: Installer, image: ImageComponent, size: int) -> None:
        self.inst = inst
        self.image = image
        self.size = size
        self.received = 0
        self.raw_written = 0
        self.blob_hash = hashlib.sha256()
        self.raw_hash = hashlib.sha256()
        self.head = bytearray()
        self.unsynced = 0
        # Both hashes run on one worker thread (FIFO: update order is kept; hashlib drops
        # the GIL), overlapping decrypt, zstd and the writes of the next records on the
        # other core. A few chunks in flight at most, so memory stays bounded.
        self.hasher: ThreadPoolExecutor | None = ThreadPoolExecutor(1, "image-hash")
        self.hashing: deque[Future[None]] = deque()
        # A writer, not decompressobj(): decompressobj returns everything one input record
        # decodes to in one piece (a run of zeros came out as 323 MB from 64 KiB), while
        # the writer hands the output on in pieces of at most DECODE_PIECE bytes, so memory
        # stays bounded and raw_size stops a decompression bomb within one piece.
        self.dobj = (
            zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_writer(
                cast("IO[bytes]", _RawSink(self)),
                write_size=DECODE_PIECE,
                write_return_read=True,
                closefd=False,
            )
            if image.encoding == "zstd"
            else None
        )
        self.fd: int | None = os.open(inst.parts["root-a"], os.O_WRONLY | os.O_CLOEXEC)

    def write(self, data: bytes) -> None:
        if self.fd is None:
            raise InstallError("sink_closed", "image sink already finished or closed")
        if self.received + len(data) > self.size:
            raise InstallError("too_many_bytes", f"image blob is declared as {self.size} bytes")
        self.received += len(data)
        self._hash(self.blob_hash, data)
        if self.dobj is None:
            self._raw(data)
            return
        try:
            self.dobj.write(data)
        except zstandard.ZstdError as e:
            raise InstallError("bad_image", f"zstd: {e}") from e

    def _raw(self, raw: bytes) -> None:
        if not raw:
            return
        if self.raw_written + len(raw) > self.image.raw_size:
            raise InstallError("image_too_large", f"raw image exceeds {self.image.raw_size}")
        if self.fd is None:
            raise InstallError("sink_closed", "image sink already finished or closed")
        self._hash(self.raw_hash, raw)
        view = memoryview(raw)
        if self.raw_written < HEAD:
            take = min(HEAD - self.raw_written, len(view))
            self.head += view[:take]
            self.raw_written += take
            view = view[take:]
        while view:
            try:
                n = os.pwrite(self.fd, view, self.raw_written)
            except OSError as e:
                raise InstallError("io_error", f"writing slot A: {e}") from e
            self.raw_written += n
            self.unsynced += n
            view = view[n:]
        if self.unsynced >= SYNC_EVERY:
            self._sync()

    def _hash(self, digest: Any, data: bytes) -> None:
        if self.hasher is None:
            raise InstallError("sink_closed", "image sink already finished or closed")
        while len(self.hashing) >= HASH_IN_FLIGHT:
            self.hashing.popleft().result()
        self.hashing.append(self.hasher.submit(digest.update, data))

    def _hashed(self) -> None:
        """Wait until every byte handed to _hash is in its digest."""
        while self.hashing:
            self.hashing.popleft().result()

    def _sync(self) -> None:
        if self.fd is None:
            raise InstallError("sink_closed", "image sink already finished or closed")
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise InstallError("io_error", f"syncing slot A: {e}") from e
        self.inst.durable_bytes += self.unsynced
        self.unsynced = 0
        self.inst.emit_progress()

    def finish(self) -> None:
        if self.fd is None:
            raise InstallError("sink_closed", "image sink already finished or closed")
        self._hashed()
        blob_hex = self.image.blob.removeprefix("sha256:")
        if self.received != self.size or self.blob_hash.hexdigest() != blob_hex:
            raise InstallError("blob_hash", "the image blob does not match the manifest")
        # A zstd stream that ended early decodes to fewer than raw_size bytes: caught below.
        if self.raw_written != self.image.raw_size:
            raise InstallError("bad_image", f"image decoded to {self.raw_written} bytes")
        if self.raw_hash.hexdigest() != self.image.raw_sha256:
            raise InstallError("image_hash", "decoded image does not match raw_sha256")
        try:
            os.pwrite(self.fd, bytes(self.head), 0)
            self.unsynced += len(self.head)
            self._sync()
            _flush_device(self.fd)
        except OSError as e:
            raise InstallError("io_error", f"slot A: {e}") from e
        self.close()
        got = self.inst.read_back_slot_a(self.image.raw_size)
        if got != self.image.raw_sha256:
            raise InstallError("read_back", "slot A read back differs from the image")
        self.inst.image_sha256 = got

    def close(self) -> None:
        if self.hasher is not None:
            self.hasher.shutdown(wait=True, cancel_futures=True)
            self.hasher = None
            self.hashing.clear()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _PackSink:
    """The daemon pack: staged under .spk-incoming, checked, then unpacked file by file."""

    def __init__(self, inst: Installer, daemon: DaemonComponent, size: int) -> None:
        self.inst = inst
        self.daemon = daemon
        self.size = size
        self.received = 0
        self.hash = hashlib.sha256()
        incoming = inst.mountpoint / ".spk-incoming"
        incoming.mkdir(mode=0o700, exist_ok=True)
        self.hex = daemon.pack.removeprefix("sha256:")
        self.part = incoming / f"{self.hex}.part"
        self.final = incoming / self.hex
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd: int | None = os.open(self.part, flags, 0o600)

    def write(self, data: bytes) -> None:
        if self.fd is None:
            raise InstallError("sink_closed", "pack sink already finished or closed")
        if self.received + len(data) > self.size:
            raise InstallError("too_many_bytes", f"daemon pack is declared as {self.size} bytes")
        self.received += len(data)
        self.hash.update(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            raise InstallError("io_error", f"writing the daemon pack: {e}") from e

    def finish(self) -> None:
        if self.fd is None:
            raise InstallError("sink_closed", "pack sink already finished or closed")
        if self.received != self.size or self.hash.hexdigest() != self.hex:
            raise InstallError("blob_hash", "the daemon pack does not match the manifest")
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise InstallError("io_error", f"daemon pack: {e}") from e
        os.close(self.fd)
        self.fd = None
        os.replace(self.part, self.final)
        durable.fsync_dir(self.final.parent)
        self.inst.durable_bytes += self.size
        self.inst.emit_progress()
        self.inst.unpack(self.final, self.daemon)

    def close(self) -> None:
        """Discard an unfinished pack (a finished one has been renamed already)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.part.unlink(missing_ok=True)


# ---- the installer --------------------------------------------------------------------


@dataclass
class _State:
    prepared: bool = False
    mounted: bool = False
    boot_started: bool = False
    finalized: bool = False
    sinks: list[Any] = field(default_factory=list)


class Installer:
    def __init__(self, resolved: ResolvedPlan, mountpoint: Path, emit: Emit) -> None:
        self.plan = resolved
        self.disk = resolved.disk
        self.mountpoint = mountpoint
        self.emit = emit
        self.partuuids = {name: str(uuid.uuid4()) for name in PART_NAMES}
        self.data_uuid = str(uuid.uuid4())
        esp_id = secrets.token_hex(4).upper()
        self.esp_volume_id = esp_id  # mkfs.vfat -i; shows as XXXX-XXXX
        self.esp_uuid = f"{esp_id[:4]}-{esp_id[4:]}"
        self.parts: dict[str, str] = {}
        self.made_nodes: list[str] = []
        self.durable_bytes = 0
        self.image_sha256: str | None = None
        self.daemon_release: str | None = None
        self.state = _State()
        manifest = resolved.manifest
        self.total_bytes = sum(manifest.blobs.values())

    # -- events

    def phase(self, name: str, **extra: Any) -> None:
        self.emit("phase", {"phase": name, **extra})

    def emit_progress(self) -> None:
        self.emit("progress", {"durable_bytes": self.durable_bytes, "total": self.total_bytes})

    # -- prepare

    def prepare(self) -> None:
        """Wipe, partition, make filesystems, mount data. Raises InstallError."""
        self._check_disk()
        self.phase("wipe")
        self._wipe()
        self.phase("partition")
        _run(
            [
                "sfdisk",
                "--quiet",
                "--wipe",
                "always",
                "--wipe-partitions",
                "always",
                self.disk.path,
            ],
            "partition",
            stdin=self.plan.layout.sfdisk_script(self.partuuids),
        )
        self._reread_partitions()
        self.phase("mkfs")
        _run(
            ["mkfs.vfat", "-F", "32", "-n", "SPK_ESP", "-i", self.esp_volume_id, self.parts["esp"]],
            "mkfs",
        )
        _run(
            ["mkfs.ext4", "-q", "-F", "-L", DATA_LABEL, "-U", self.data_uuid, self.parts["data"]],
            "mkfs",
        )
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        _run(["mount", "-t", "ext4", self.parts["data"], str(self.mountpoint)], "mount")
        self.state.mounted = True
        self.state.prepared = True

    def _check_disk(self) -> None:
        # The device behind the name must still be the disk that was planned.
        try:
            sectors = int(Path(f"/sys/class/block/{self.disk.name}/size").read_text())
        except (OSError, ValueError) as e:
            raise InstallError("disk_gone", f"{self.disk.path}: {e}") from e
        if sectors * 512 != self.disk.size:
            raise InstallError(
                "disk_changed", f"{self.disk.path} is no longer {self.disk.size} bytes"
            )

    def _old_partitions(self) -> list[str]:
        base = Path(f"/sys/block/{self.disk.name}")
        return sorted(
            f"/dev/{p.name}" for p in base.glob(f"{self.disk.name}*") if (p / "partition").exists()
        )

    def _wipe(self) -> None:
        """Old boot code and both GPT copies gone before anything new is written."""
        for part in self._old_partitions():
            if os.path.exists(part):
                _try(["wipefs", "--all", "--quiet", part])
        _run(["wipefs", "--all", "--quiet", self.disk.path], "wipe")
        try:
            fd = os.open(self.disk.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                zeros = bytes(MIB)
                os.pwrite(fd, zeros, 0)
                os.pwrite(fd, zeros, max(size - MIB, 0))
                _flush_device(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise InstallError("wipe", f"{self.disk.path}: {e}") from e
        # Kernel partitions of the old table would otherwise linger (and keep names busy).
        _try(["partx", "--delete", self.disk.path])

    def _sysfs_ready(self) -> bool:
        base = Path(f"/sys/block/{self.disk.name}")
        return all(
            (base / _part_name(self.disk.name, i)).is_dir() for i in range(1, len(PART_NAMES) + 1)
        )

    def _wait(self, cond: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.05)
        return cond()

    def _reread_partitions(self) -> None:
        """partprobe (or BLKRRPART); `partx --update` where the kernel lacks a GPT parser."""
        if shutil.which("partprobe"):
            _try(["partprobe", self.disk.path])
        else:
            _try(["blockdev", "--rereadpt", self.disk.path])
        if shutil.which("udevadm"):
            _try(["udevadm", "settle", "--timeout=10"])
        if not self._wait(self._sysfs_ready, 1.0):
            _try(["partx", "--update", self.disk.path])
            if not self._wait(self._sysfs_ready, APPEAR_TIMEOUT_S):
                raise InstallError("partition", f"partitions of {self.disk.path} did not appear")
        for i, name in enumerate(PART_NAMES, start=1):
            self.parts[name] = self._node(i)

    def _node(self, index: int) -> str:
        """The partition's device node; made by hand where no udev/devtmpfs made it."""
        part = _part_name(self.disk.name, index)
        node = f"/dev/{part}"
        if self._wait(lambda: os.path.exists(node), 2.0):
            return node
        major, minor = Path(f"/sys/block/{self.disk.name}/{part}/dev").read_text().split(":")
        os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(int(major), int(minor)))
        self.made_nodes.append(node)
        return node

    # -- receive

    def receive(self, blob_id: str, size: int) -> BlobSink:
        if not self.state.prepared:
            raise InstallError("not_prepared", "receive before prepare")
        manifest = self.plan.manifest
        if manifest.blobs.get(blob_id) != size:
            raise InstallError("unknown_blob", f"{blob_id} ({size} bytes) is not in the manifest")
        sink: _ImageSink | _PackSink
        if manifest.image is not None and blob_id == manifest.image.blob:
            self.phase("image")
            sink = _ImageSink(self, manifest.image, size)
        elif manifest.daemon is not None and blob_id == manifest.daemon.pack:
            self.phase("daemon")
            sink = _PackSink(self, manifest.daemon, size)
        else:
            raise InstallError("unknown_blob", f"{blob_id} belongs to no component")
        self.state.sinks.append(sink)
        return sink

    def read_back_slot_a(self, raw_size: int) -> str:
        """sha256 of slot A's first raw_size bytes, read from the device after a cache drop."""
        self.phase("read_back")
        digest = hashlib.sha256()
        try:
            fd = os.open(self.parts["root-a"], os.O_RDONLY | os.O_CLOEXEC)
            try:
                _flush_device(fd)
                offset = 0
                while offset < raw_size:
                    chunk = os.pread(fd, min(READ_CHUNK, raw_size - offset), offset)
                    if not chunk:
                        raise InstallError("read_back", f"slot A ends at {offset} bytes")
                    digest.update(chunk)
                    offset += len(chunk)
            finally:
                os.close(fd)
        except OSError as e:
            raise InstallError("io_error", f"reading slot A back: {e}") from e
        return digest.hexdigest()

    def unpack(self, pack: Path, daemon: DaemonComponent) -> None:
        """Files out of the pack into releases/<id>, each checked, then `current` -> it."""
        self.phase("unpack")
        opt = self.mountpoint / "opt" / "smechvisord"
        releases = opt / "releases"
        releases.mkdir(parents=True, exist_ok=True)
        rid = swap.release_id(daemon, self.plan.manifest_sha256)
        staging = releases / f".{rid}.staging"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(mode=0o755)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with pack.open("rb") as src:
            for entry in daemon.files:
                path = staging / entry.path
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                digest = hashlib.sha256()
                fd = os.open(path, flags, 0o600)
                try:
                    left = entry.size
                    while left:
                        chunk = src.read(min(READ_CHUNK, left))
                        if not chunk:
                            raise InstallError("bad_pack", f"pack ends inside {entry.path}")
                        digest.update(chunk)
                        os.write(fd, chunk)
                        left -= len(chunk)
                    os.fchmod(fd, entry.mode & 0o555)
                finally:
                    os.close(fd)
                if digest.hexdigest() != entry.sha256:
                    raise InstallError("file_hash", f"{entry.path} does not match the manifest")
            if src.read(1):
                raise InstallError("bad_pack", "pack has bytes after its last file")
        for link in daemon.symlinks:
            path = staging / link.path
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.symlink(link.target, path)
        durable.fsync_tree(staging)
        final = releases / rid
        os.rename(staging, final)
        durable.fsync_dir(releases)
        problems = swap.verify_tree(final, daemon)
        if problems:
            raise InstallError("file_hash", "; ".join(problems[:5]))
        durable.flip_symlink(opt / "current", f"releases/{rid}")
        pack.unlink()
        shutil.rmtree(pack.parent, ignore_errors=True)
        self.daemon_release = rid

    # -- finalize

    def finalize(self) -> dict[str, Any]:
        """Config, then the bootloader last; the REPORT document.

        Raises InstallError for anything before the bootloader (the caller aborts). A
        bootloader step that fails is reported per path (`boot`), with `ok` false.
        """
        manifest = self.plan.manifest
        if self.image_sha256 is None:
            raise InstallError("incomplete", "the base image was not received and verified")
        if manifest.daemon is not None and self.daemon_release is None:
            raise InstallError("incomplete", "the daemon tree was not received and verified")
        self.phase("config")
        boot_dir = self.mountpoint / "boot"
        self._write_config()
        ids = bootloader.BootIds(
            data_fs_uuid=self.data_uuid,
            slot_partuuid={"a": self.partuuids["root-a"], "b": self.partuuids["root-b"]},
        )
        try:
            bootloader.write_config(boot_dir, ids)
        except bootloader.BootloaderError as e:
            raise InstallError("config", str(e)) from e
        os.sync()
        self.phase("bootloader")
        self.state.boot_started = True
        boot: dict[str, str] = {}
        try:
            bootloader.install_bios(self.disk.path, boot_dir)
            boot["bios"] = "ok"
        except (bootloader.BootloaderError, OSError) as e:
            boot["bios"] = f"failed: {e}"
        try:
            size = bootloader.install_efi(self.parts["esp"], boot_dir, self.data_uuid)
            boot["efi_fallback"] = f"ok ({size} bytes)"
        except (bootloader.BootloaderError, OSError) as e:
            boot["efi_fallback"] = f"failed: {e}"
        # An NVRAM entry only makes sense when this boot is UEFI with efivarfs; the
        # removable path above is what firmware finds after an NVRAM reset anyway.
        boot["nvram"] = "skipped"
        os.sync()
        self._unmount()
        ok = boot["bios"] == "ok" and boot["efi_fallback"].startswith("ok")
        self.state.finalized = ok
        self.phase("done" if ok else "bootloader_failed")
        return {
            "ok": ok,
            "disk": self.disk.serial,
            "manifest_sha256": self.plan.manifest_sha256,
            "release": manifest.release.version,
            "slot_a_sha256": self.image_sha256,
            "daemon_release": self.daemon_release,
            "partuuids": dict(self.partuuids),
            "data_uuid": self.data_uuid,
            "esp_uuid": self.esp_uuid,
            "boot": boot,
            "durable_bytes": self.durable_bytes,
        }

    def fstab(self) -> str:
        return (
            "# Written by spk-visor deploy: filesystems by UUID, never by device name.\n"
            "# / is the booted slot (root=PARTUUID= on the kernel command line).\n"
            f"UUID={self.data_uuid} {DATA_MOUNT} ext4 defaults 0 2\n"
            f"{DATA_MOUNT}/boot /boot none bind 0 0\n"
            f"{DATA_MOUNT}/opt/smechvisord /opt/smechvisord none bind 0 0\n"
            f"{DATA_MOUNT}/var/lib /var/lib none bind 0 0\n"
            f"UUID={self.esp_uuid} /boot/efi vfat umask=0077,nofail 0 1\n"
        )

    def _write_config(self) -> None:
        etc = self.mountpoint / "etc"
        etc.mkdir(mode=0o755, exist_ok=True)
        (self.mountpoint / "var" / "lib").mkdir(mode=0o755, parents=True, exist_ok=True)
        # World-readable, as every system reads them.
        durable.write_bytes(etc / "fstab", self.fstab().encode(), 0o644)
        durable.write_bytes(etc / "hostname", f"{self.plan.hostname}\n".encode(), 0o644)
        manifest = self.plan.manifest
        record = {
            "manifest_sha256": self.plan.manifest_sha256,
            "release": {"version": manifest.release.version, "counter": manifest.release.counter},
            "disk_serial": self.disk.serial,
            "slot_a_sha256": self.image_sha256,
            "daemon_release": self.daemon_release,
            "partuuids": self.partuuids,
            "data_uuid": self.data_uuid,
            "esp_uuid": self.esp_uuid,
            "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        durable.write_bytes(etc / "spk-deploy.json", (json.dumps(record, indent=2) + "\n").encode())
        durable.write_bytes(etc / "spk-deploy.manifest.json", self.plan.manifest_raw)

    def _unmount(self) -> None:
        if not self.state.mounted:
            return
        if not _try(["umount", str(self.mountpoint)]):
            _try(["umount", "--lazy", str(self.mountpoint)])
        self.state.mounted = False

    # -- abort

    def abort(self, reason: str) -> list[str]:
        """Leave no boot path and no mountable slot A; unmount. Returns what could not be undone."""
        self.phase("aborted", reason=reason)
        for sink in self.state.sinks:
            sink.close()
        problems: list[str] = []
        if not self.state.finalized:
            problems += bootloader.remove_boot_code(
                self.disk.path, self.parts.get("bios_grub"), self.parts.get("esp")
            )
            root_a = self.parts.get("root-a")
            if root_a:
                try:
                    fd = os.open(root_a, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.pwrite(fd, bytes(HEAD), 0)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError as e:
                    problems.append(f"slot A head: {e}")
        self._unmount()
        return problems
