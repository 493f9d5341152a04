"""Plan validation and the install to disk (deploy.md, "What the receiver does on the disk").

`validate_plan` touches nothing: it resolves the disk by serial and size, checks the wipe
confirmation, verifies the manifest's signatures against the trust root baked into the
shim and works out the layout. `Installer` then does, in this order and never otherwise:

    prepare   through spk_visor.install.disk: wipe old boot code and both GPT copies,
              write the `ab` GPT (spk_visor.install.layout), make the ESP (mkfs.vfat,
              written later with mtools: no vfat mount needed) and the data filesystem;
              then mount data
    receive   one sink per blob: the base image goes through spk_visor.install's image
              writer onto root-a (decoded, hashed and written on their own threads, each
              window read back and compared as it goes, its first MiB written only after
              both signed hashes match); the daemon pack is staged, checked, and unpacked
              by spk_visor.install.tree under opt/smechvisord/releases/<id>. While the
              image streams, a thread writes fstab, hostname, grub.cfg + grubenv and
              prepares GRUB (modules, core.img, BOOTX64.EFI) on the data partition only
    finalize  the deploy record, then the boot path LAST: grub-bios-setup (MBR and the
              BIOS-boot partition), then BOOTX64.EFI onto the ESP
    abort     boot code removed, slot A's head zeroed, data unmounted: firmware falls
              through to the next boot device rather than into a half-written system

Node configuration lives on the data partition, not in slot A: slot A holds the signed
image byte for byte (every byte read back and compared), and OTA later writes a fresh
image to slot B, which would not carry anything the installer added. The installed
system mounts the data partition at DATA_MOUNT and bind-mounts boot/, opt/smechvisord/
and var/lib/ from it (the fstab below); the base image is expected to use `<data>/etc/fstab`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import secrets
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from spk_visor.deploy import authkeys, bootloader, channel
from spk_visor.deploy.hostname import problem as hostname_problem
from spk_visor.deploy.inventory import Disk
from spk_visor.errors import OperatorNeededError, RefusedError, SpkVisorError, VerificationError
from spk_visor.install import blockdev, runner, tree
from spk_visor.install import disk as disk_prep
from spk_visor.install import image as image_writer
from spk_visor.install import layout as disk_layout
from spk_visor.install.layout import PART_NAMES, Layout
from spk_visor.install.store_copy import StoreCopy
from spk_visor.ota import durable
from spk_visor.ota.journal import Installed as InstalledRecord
from spk_visor.ota.nodeconf import NodePaths
from spk_visor.ota.store import BlobStore
from spk_visor.ota.verify import verify_manifest
from spk_visor.trust import dsse
from spk_visor.trust.manifest import DaemonComponent, ImageComponent, Manifest
from spk_visor.trust.roots import Root
from spk_visor.trust.verify import BlobCheck, Verified

SECTOR_SIZES = (512, 4096)
DATA_MOUNT = "/data"
# Held back while the image streams and written last (slots.py does the same): every
# filesystem keeps its superblock in here, so an unfinished slot A has no mountable fs.
HEAD = image_writer.HEAD
# Records in hand, each, for the image decoder (RecordPipe) and the store copy
# (StoreCopy). Why a record's receive buffer is never reused while either still reads it:
# the channel overwrites record i's buffer only when it receives record i + RECV_RING,
# which the session does after handing records i+1 .. i+RECV_RING-1 to both. Each takes
# records in order and lets `put` return only while fewer than PIPE_DEPTH are in its
# hands, so both have let go of record i once put(i + PIPE_DEPTH) has returned to the
# session. PIPE_DEPTH <= RECV_RING - 1 is therefore enough; one less leaves a spare.
# (tests/unit/test_deploy_image_sink.py feeds a ring of RECV_RING buffers the same way.)
PIPE_DEPTH = channel.RECV_RING - 2
PLAN_KEYS = {"manifest", "disk", "layout", "hostname", "confirm_wipe_serial", "authorized_keys"}
DISK_KEYS = {"serial", "size"}
MAX_PATH = 1024
MAX_COMPONENT = 255
_TIMEOUT_S = 600

Emit = Callable[[str, dict[str, Any]], None]


class PlanRefused(RefusedError):
    """A PLAN the receiver will not act on; `reason` is machine-readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InstallError(OperatorNeededError):
    """A step of the install failed; the caller must `abort`. `reason` is machine-readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---- layout ---------------------------------------------------------------------------


def plan_layout(disk_size: int, image_raw: int, pack_size: int, image_blob: int = 0) -> Layout:
    """Sizes for a disk (install/layout.py), or PlanRefused("disk_too_small")."""
    try:
        return disk_layout.plan(disk_size, image_raw, pack_size, image_blob)
    except disk_layout.TooSmall as e:
        raise PlanRefused("disk_too_small", e.message) from e


# ---- plan validation ------------------------------------------------------------------


@dataclass
class ResolvedPlan:
    disk: Disk
    verified: Verified
    manifest_raw: bytes
    layout: Layout
    hostname: str
    wipe_confirmed: bool
    authorized_keys: str | None = None

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
    why = hostname_problem(hostname)
    if why is not None:
        raise PlanRefused("bad_hostname", why)
    keys = plan.get("authorized_keys")
    if keys is not None:
        if not isinstance(keys, str):
            raise PlanRefused("bad_authorized_keys", "authorized_keys must be a string")
        try:
            keys = authkeys.validate(keys)
        except ValueError as e:
            raise PlanRefused("bad_authorized_keys", str(e)) from e
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
        # The one signature check of the plan (verify_manifest checks them first).
        verified = verify_manifest(env, trust_root, start=now or dt.datetime.now(dt.UTC))
    except dsse.SignatureError as e:
        raise PlanRefused("bad_signature", str(e)) from e
    except VerificationError as e:
        raise PlanRefused("bad_manifest", str(e)) from e
    parsed = verified.manifest
    if parsed.image is None:
        raise PlanRefused("bad_manifest", "the release has no base image to install")
    _check_names(parsed)
    pack_size = parsed.blobs[parsed.daemon.pack] if parsed.daemon else 0
    image_blob = parsed.blobs[parsed.image.blob]
    layout = plan_layout(disk.size, parsed.image.raw_size, pack_size, image_blob)
    return ResolvedPlan(disk, verified, env.to_bytes(), layout, hostname, confirm is not None, keys)


# ---- sinks ----------------------------------------------------------------------------


class BlobSink(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


def _store_error(e: BaseException) -> InstallError:
    return InstallError("io_error", f"the store copy of the image: {e}")


def _install_error(e: BaseException) -> InstallError:
    """The image writer's refusals and the device's I/O errors, as REPORT reasons."""
    if isinstance(e, InstallError):
        return e
    if isinstance(e, image_writer.ImageError):
        return InstallError(e.reason, e.message)
    if isinstance(e, OSError):
        return InstallError("io_error", f"slot A: {e}")
    return InstallError("image_failed", f"{type(e).__name__}: {e}")


class _ImageSink:
    """The base image, through the image writer shared with OTA, onto root-a.

    The session thread only hands records on, without a copy, to the store copy's thread
    (install/store_copy.py: it writes the blob into the node's OTA store and takes the
    blob's sha256 and size) and to the decoder (a RecordPipe that does not hash);
    decoding runs on this sink's thread and hashing, writing and the read-back of each
    window on the writer's, so receiving, decrypting, decoding, hashing and writing all
    overlap. The writer checks the blob against the store copy's final hash: `finish`
    waits for the store copy before it closes the pipe with it. Every window is read back
    and compared as it goes: nothing is read or hashed again after the stream. The first
    MiB is written last, after both signed hashes matched."""

    def __init__(self, inst: Installer, image: ImageComponent, size: int) -> None:
        self.inst = inst
        self.image = image
        self.size = size
        self.received = 0
        self.error: BaseException | None = None
        self.pipe = image_writer.RecordPipe(PIPE_DEPTH, hashed=False)
        # The blob as it came, into the node's OTA store: the installed node can then send
        # this very release to a peer. It enters blobs/ only once the writer has checked
        # the stream against the blob's signed hash and size.
        self.copy_fd: int | None = None
        try:
            self.copy_fd = inst.store_partial(image.blob)
        except OSError as e:
            raise _store_error(e) from e
        try:
            fd, direct = blockdev.open_for_writing(inst.parts["root-a"])
        except (OSError, SpkVisorError) as e:
            os.close(self.copy_fd)
            inst.store.discard_partial(image.blob)
            raise InstallError("io_error", f"opening slot A: {e}") from e
        self.fd: int | None = fd
        start = inst.durable_bytes
        self.writer = image_writer.ImageWriter(
            fd, direct, image, size, on_durable=lambda done: self._durable(start + done)
        )
        self.copy = StoreCopy(self.copy_fd, PIPE_DEPTH, _store_error)
        self.thread = threading.Thread(target=self._decode, name="image-decode", daemon=True)
        self.thread.start()

    def figures(self) -> dict[str, dict[str, float]]:
        """The writer's thread clocks (`blob`: `put_wait_s`, the session thread waiting
        for room in the decoder's pipe) and the store copy's (writing and, `hash_s` of
        it, hashing the blob; `put_wait_s`: the session waiting for room in its queue)."""
        return {**self.writer.figures(), "store": self.copy.figures()}

    def _durable(self, n: int) -> None:
        self.inst.durable_bytes = n

    def _decode(self) -> None:
        try:
            self.writer.stream(self.pipe)
        except BaseException as e:
            self.error = e
            self.pipe.fail(_install_error(e))

    def write(self, data: bytes | memoryview) -> None:
        """Hand one record on to the store copy and the decoder; it must stay unchanged
        until both have let go of it (the channel's receive ring guarantees that: see
        PIPE_DEPTH)."""
        if self.fd is None:
            raise InstallError("sink_closed", "image sink already finished or closed")
        if self.received + len(data) > self.size:
            raise InstallError("too_many_bytes", f"image blob is declared as {self.size} bytes")
        self.received += len(data)
        try:
            view = memoryview(data)
            # The decoder first: it is the stream's slowest stage, and the store copy may
            # lag (it only has to be done by finish). The other order held each record
            # back from the decoder while the store copy's queue was full.
            self.pipe.put(view)
            self.copy.put(view)
        except InstallError:
            raise
        except BaseException as e:
            raise _install_error(e) from e

    def finish(self) -> None:
        if self.fd is None:
            raise InstallError("sink_closed", "image sink already finished or closed")
        # The store copy's final size and hash first: the pipe's end carries them, so the
        # writer's blob check (after the decoder sees the end) never reads a partial hash,
        # and a store error stops everything before the head is written.
        try:
            blob = self.copy.finish()
        except BaseException as e:
            raise _install_error(e) from e
        self.pipe.close(blob=blob)
        self.thread.join()
        try:
            if self.error is not None:
                raise self.error
            self.writer.write_ends()
            self.writer.check_ends()
        except BaseException as e:
            raise _install_error(e) from e
        self._durable(self.inst.durable_bytes + len(self.writer.head) + len(self.writer.tail))
        self.inst.emit_progress()
        if self.copy_fd is not None:
            try:
                os.fsync(self.copy_fd)
                os.close(self.copy_fd)
                self.copy_fd = None
                self.inst.store.promote(self.image.blob)
            except OSError as e:
                raise _store_error(e) from e
        self.inst.image_sha256 = self.image.raw_sha256
        self.close()

    def close(self) -> None:
        if self.thread.is_alive():
            closed = InstallError("sink_closed", "image sink closed")
            self.pipe.fail(closed)
            self.pipe.close(closed)
            self.thread.join()
        self.copy.stop()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.copy_fd is not None:
            os.close(self.copy_fd)
            self.copy_fd = None
            self.inst.store.discard_partial(self.image.blob)


class _PackSink:
    """The daemon pack: staged under .spk-incoming, checked, then unpacked file by file."""

    def __init__(self, inst: Installer, daemon: DaemonComponent, size: int) -> None:
        self.inst = inst
        self.daemon = daemon
        self.size = size
        # Size and signed hash, checked as OTA checks a blob (trust.verify).
        self.check = BlobCheck(daemon.pack, size)
        incoming = inst.mountpoint / ".spk-incoming"
        incoming.mkdir(mode=0o700, exist_ok=True)
        self.hex = daemon.pack.removeprefix("sha256:")
        self.part = incoming / f"{self.hex}.part"
        self.final = incoming / self.hex
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd: int | None = os.open(self.part, flags, 0o600)

    def write(self, data: bytes | memoryview) -> None:
        if self.fd is None:
            raise InstallError("sink_closed", "pack sink already finished or closed")
        try:
            self.check.update(data)
        except VerificationError as e:
            raise InstallError("too_many_bytes", e.message) from e
        try:
            blockdev.write_all(self.fd, data)
        except OSError as e:
            raise InstallError("io_error", f"writing the daemon pack: {e}") from e

    def finish(self) -> None:
        if self.fd is None:
            raise InstallError("sink_closed", "pack sink already finished or closed")
        try:
            self.check.finish()
        except VerificationError as e:
            raise InstallError("blob_hash", f"the daemon pack: {e.message}") from e
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


@dataclass
class _BootPrep:
    """What start_boot_prep's thread made: an error, or what finalize finishes from."""

    thread: threading.Thread
    config: BaseException | None = None
    bios: bool | BaseException = False  # True: core.img ready for grub-bios-setup
    efi: Path | BaseException | None = None


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
        self.durable_bytes = 0
        self.image_sha256: str | None = None
        self.daemon_release: str | None = None
        self.state = _State()
        self._boot_prep: _BootPrep | None = None
        manifest = resolved.manifest
        self.total_bytes = sum(manifest.blobs.values())

    # -- events

    def phase(self, name: str, **extra: Any) -> None:
        self.emit("phase", {"phase": name, **extra})

    def emit_progress(self) -> None:
        self.emit("progress", {"durable_bytes": self.durable_bytes, "total": self.total_bytes})

    # -- prepare

    def prepare(self) -> None:
        """Wipe, partition, make filesystems (install/disk.py), mount data. Raises
        InstallError."""
        path, name = self.disk.path, self.disk.name
        try:
            disk_prep.check_size(path, name, self.disk.size)
            self.phase("wipe")
            disk_prep.wipe(path, name)
            self.phase("partition")
            self.parts = disk_prep.partition(path, name, self.plan.layout, self.partuuids)
            self.phase("mkfs")
            esp, data = self.parts["esp"], self.parts["data"]
            disk_prep.make_filesystems(esp, self.esp_volume_id, data, self.data_uuid)
        except disk_prep.DiskError as e:
            raise InstallError(e.reason, e.detail) from e
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        runner.run_checked(
            ["mount", "-t", "ext4", self.parts["data"], str(self.mountpoint)],
            functools.partial(InstallError, "mount"),
            timeout=_TIMEOUT_S,
        )
        self.state.mounted = True
        self.state.prepared = True

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
            self.start_boot_prep()
        elif manifest.daemon is not None and blob_id == manifest.daemon.pack:
            self.phase("daemon")
            sink = _PackSink(self, manifest.daemon, size)
        else:
            raise InstallError("unknown_blob", f"{blob_id} belongs to no component")
        self.state.sinks.append(sink)
        return sink

    def unpack(self, pack: Path, daemon: DaemonComponent) -> None:
        """The release tree staged from the pack (install/tree.py, as OTA does), then
        `current` -> it."""
        self.phase("unpack")
        opt = self.mountpoint / "opt" / "smechvisord"
        rid = tree.release_id(daemon, self.plan.manifest_sha256)
        try:
            tree.stage(opt / "releases", rid, pack, daemon)
        except VerificationError as e:
            raise InstallError("file_hash", e.message) from e
        except OSError as e:
            raise InstallError("io_error", f"unpacking the daemon tree: {e}") from e
        durable.flip_symlink(opt / "current", f"releases/{rid}")
        # The verified pack stays, in the node's OTA store (see _ImageSink).
        self.store.ensure()
        os.replace(pack, self.store.path(daemon.pack))
        durable.fsync_dir(self.store.blobs_dir)
        shutil.rmtree(pack.parent, ignore_errors=True)
        self.daemon_release = rid

    # -- the node's OTA state on the data partition (bind-mounted at /var/lib)

    @property
    def store(self) -> BlobStore:
        return BlobStore(NodePaths(self.mountpoint))

    def store_partial(self, blob_id: str) -> int:
        store = self.store
        store.ensure()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(store.partial(blob_id), flags, 0o600)

    def _write_ota_state(self) -> None:
        """The signed manifest next to its blobs, and installed.json saying what slot A and
        `current` hold, as an OTA commit would: `ota status` is right on first boot, the
        next update sees what is unchanged, and `deploy send` on the node finds its release
        (commands/deploy.py)."""
        manifest = self.plan.manifest
        self.store.save_manifest(self.plan.manifest_sha256, self.plan.manifest_raw)
        hexd, counter, version = (
            self.plan.manifest_sha256,
            manifest.release.counter,
            manifest.release.version,
        )
        doc: dict[str, Any] = {"manifest": hexd, "counter": counter, "version": version}
        if manifest.image is not None:
            image = manifest.image
            doc["base"] = {
                "slot": "a",
                "manifest": hexd,
                "raw_sha256": image.raw_sha256,
                "raw_size": image.raw_size,
                "blob": image.blob,
                "version": image.version,
                "counter": counter,
            }
        if manifest.daemon is not None and self.daemon_release is not None:
            doc["daemon"] = {
                "release": self.daemon_release,
                "manifest": hexd,
                "pack": manifest.daemon.pack,
                "version": manifest.daemon.version,
                "counter": counter,
                "previous": None,
            }
        record = InstalledRecord(NodePaths(self.mountpoint))
        durable.write_json(record.path, doc)

    # -- finalize

    def finalize(self, *, unmount: bool = True) -> dict[str, Any]:
        """Config, then the bootloader last; the REPORT document.

        Raises InstallError for anything before the bootloader (the caller aborts). A
        bootloader step that fails is reported per path (`boot`), with `ok` false.

        Everything the REPORT speaks for is durable when this returns (the data
        partition's syncfs, the boot code's device syncs), so the receiver passes
        unmount=False, sends the REPORT and only then calls `unmount`: an unmount waits
        for the filesystem's last journal commit and the device's flush, and the donor
        need not wait for that.
        """
        manifest = self.plan.manifest
        if self.image_sha256 is None:
            raise InstallError("incomplete", "the base image was not received and verified")
        if manifest.daemon is not None and self.daemon_release is None:
            raise InstallError("incomplete", "the daemon tree was not received and verified")
        self.phase("config")
        boot_dir = self.mountpoint / "boot"
        prep = self._join_boot_prep()
        if prep.config is not None:
            raise InstallError("config", str(prep.config)) from prep.config
        self._write_record()
        try:
            blockdev.sync(self.mountpoint)
        except OSError as e:
            raise InstallError("io_error", f"syncing the data partition: {e}") from e
        self.phase("bootloader")
        self.state.boot_started = True
        boot: dict[str, str] = {}
        try:
            if isinstance(prep.bios, BaseException):
                raise prep.bios
            bootloader.install_bios(self.disk.path, boot_dir, prepared=prep.bios is True)
            boot["bios"] = "ok"
        except (bootloader.BootloaderError, OSError) as e:
            boot["bios"] = f"failed: {e}"
        try:
            if not isinstance(prep.efi, Path):
                raise prep.efi or bootloader.BootloaderError("efi", "not prepared")
            size = bootloader.install_efi(self.parts["esp"], prep.efi)
            boot["efi_fallback"] = f"ok ({size} bytes)"
        except (bootloader.BootloaderError, OSError) as e:
            boot["efi_fallback"] = f"failed: {e}"
        # An NVRAM entry only makes sense when this boot is UEFI with efivarfs; the
        # removable path above is what firmware finds after an NVRAM reset anyway.
        boot["nvram"] = "skipped"
        # What grub-bios-setup (the MBR, the BIOS-boot partition) and mtools (the ESP)
        # wrote, through the devices' page caches.
        try:
            blockdev.sync(self.disk.path, self.parts["bios_grub"], self.parts["esp"])
        except OSError as e:
            boot["sync"] = f"failed: {e}"
        if unmount:
            self.unmount()
        ok = boot["bios"] == "ok" and boot["efi_fallback"].startswith("ok")
        ok = ok and "sync" not in boot
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

    def ota_conf(self) -> str:
        """The node's ota.conf (the image links /etc/spk-visor/ota.conf here): the slots
        by GPT partition GUID. The image's defaults name them by partition label, and
        every SmechVisor disk has a root-a and a root-b: with a second one attached, OTA
        could write the other disk's slot. The GUIDs are unique to this install."""
        return (
            "# Written by spk-visor deploy. Every key is optional; see docs/ota.md.\n"
            "# The A/B slots of this disk by GPT partition GUID (labels repeat across\n"
            "# SmechVisor disks), and GRUB's environment on the data partition.\n"
            "[slots]\n"
            f'a = "/dev/disk/by-partuuid/{self.partuuids["root-a"]}"\n'
            f'b = "/dev/disk/by-partuuid/{self.partuuids["root-b"]}"\n'
            'grubenv = "/boot/grub/grubenv"\n'
        )

    # -- what the bootloader needs, prepared while the image streams

    def start_boot_prep(self) -> None:
        """Config files, grub.cfg, GRUB's modules, core.img and BOOTX64.EFI, on a thread
        while the image streams. None of it is on a boot path: the MBR, the BIOS-boot
        partition and the ESP are written by finalize, after every hash matched."""
        if self._boot_prep is None and self.state.prepared:
            prep = _BootPrep(threading.Thread(target=self._prepare_boot, name="boot-prep"))
            self._boot_prep = prep
            prep.thread.start()

    def _join_boot_prep(self) -> _BootPrep:
        self.start_boot_prep()
        if self._boot_prep is None:
            raise InstallError("not_prepared", "finalize before prepare")
        self._boot_prep.thread.join()
        return self._boot_prep

    def _prepare_boot(self) -> None:
        prep = self._boot_prep
        if prep is None:
            return
        boot_dir = self.mountpoint / "boot"
        ids = bootloader.BootIds(
            data_fs_uuid=self.data_uuid,
            slot_partuuid={"a": self.partuuids["root-a"], "b": self.partuuids["root-b"]},
        )
        try:
            self._write_config()
            bootloader.write_config(boot_dir, ids)
        except (bootloader.BootloaderError, OSError) as e:
            prep.config = e
            return
        try:
            prep.bios = bootloader.prepare_bios(self.disk.path, boot_dir)
        except (bootloader.BootloaderError, OSError) as e:
            prep.bios = e
        try:
            prep.efi = bootloader.prepare_efi(boot_dir, self.data_uuid)
        except (bootloader.BootloaderError, OSError) as e:
            prep.efi = e

    def _write_config(self) -> None:
        etc = self.mountpoint / "etc"
        etc.mkdir(mode=0o755, exist_ok=True)
        (self.mountpoint / "var" / "lib").mkdir(mode=0o755, parents=True, exist_ok=True)
        # World-readable, as every system reads them.
        durable.write_bytes(etc / "fstab", self.fstab().encode(), 0o644)
        durable.write_bytes(etc / "hostname", f"{self.plan.hostname}\n".encode(), 0o644)
        (etc / "spk-visor").mkdir(mode=0o755, exist_ok=True)
        durable.write_bytes(etc / "spk-visor" / "ota.conf", self.ota_conf().encode(), 0o644)
        if self.plan.authorized_keys is not None:
            self._write_authorized_keys(etc, self.plan.authorized_keys)

    @staticmethod
    def _write_authorized_keys(etc: Path, keys: str) -> None:
        """<data>/etc/ssh/authorized_keys/root, which the image's sshd_config names
        (AuthorizedKeysFile /data/etc/ssh/authorized_keys/%u). StrictModes refuses a key
        file that anyone but root can write, or whose directories are: root-owned 0755
        directories and a 0600 file, written atomically."""
        path = etc / "ssh" / "authorized_keys" / "root"
        for d in (etc, path.parent.parent, path.parent):
            d.mkdir(mode=0o755, exist_ok=True)
            os.chown(d, 0, 0)
            d.chmod(0o755)  # mkdir's mode passes through the umask
        durable.write_bytes(path, keys.encode(), 0o600)
        os.chown(path, 0, 0)

    def _write_record(self) -> None:
        """The deploy record, once the image and the daemon tree are verified."""
        etc = self.mountpoint / "etc"
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
        self._write_ota_state()

    def unmount(self) -> None:
        """Unmount the data partition (also after finalize(unmount=False) and its REPORT)."""
        if not self.state.mounted:
            return
        if not runner.succeeds(["umount", str(self.mountpoint)], timeout=_TIMEOUT_S):
            runner.succeeds(["umount", "--lazy", str(self.mountpoint)], timeout=_TIMEOUT_S)
        self.state.mounted = False

    # -- abort

    def abort(self, reason: str) -> list[str]:
        """Leave no boot path and no mountable slot A; unmount. Returns what could not be undone."""
        self.phase("aborted", reason=reason)
        for sink in self.state.sinks:
            sink.close()
        if self._boot_prep is not None:
            self._boot_prep.thread.join()  # its tools are bounded by _TIMEOUT_S
        problems: list[str] = []
        if not self.state.finalized:
            problems += bootloader.remove_boot_code(
                self.disk.path, self.parts.get("bios_grub"), self.parts.get("esp")
            )
            root_a = self.parts.get("root-a")
            if root_a:
                try:
                    blockdev.zero_head(root_a, HEAD, exclusive=False)
                except OSError as e:
                    problems.append(f"slot A head: {e}")
        self.unmount()
        return problems
