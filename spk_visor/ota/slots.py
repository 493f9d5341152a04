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

The writing itself is spk_visor.install.image's ImageWriter, shared with deploy: each
window is read back from the device and compared while the next one is written, so the
slot is never read and hashed a second time (its docstring says why that proves as much).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spk_visor.errors import (
    BusyError,
    ConfigError,
    ExitCode,
    OperatorNeededError,
    RefusedError,
    VerificationError,
)
from spk_visor.install import blockdev
from spk_visor.install import image as image_writer
from spk_visor.ota import durable
from spk_visor.ota.context import OtaContext
from spk_visor.ota.journal import BasePhase, now_iso
from spk_visor.ota.nodeconf import Slots
from spk_visor.trust.manifest import ImageComponent, Manifest

COMPONENT = "base"
SLOTS = ("a", "b")
CMDLINE_KEY = "smechvisor.slot"
# Held back during the stream and written last (by the image writer); also what
# invalidation zeroes. Every filesystem a slot could hold keeps its superblock in here.
HEAD = image_writer.HEAD
# Per health check; a check that hangs is a failed check.
HEALTH_TIMEOUT_S = 60.0
# Phases whose interruption means the slot holds unverified bytes.
PENDING = ("invalidating", "writing", "verifying")
_OUTPUT_TAIL = 400


class TrialInProgress(BusyError):
    """A staged base is being tried (booted, boot-check not done): nothing else may change
    the node until boot-check commits or rejects it. One error wherever it is noticed."""

    def __init__(self) -> None:
        super().__init__(
            "a base trial boot is in progress", "wait for boot-check to commit or roll back"
        )


def check_no_trial(ctx: OtaContext, booted: str | None = None) -> None:
    """TrialInProgress when the journal says trial, or says staged while this boot runs
    the staged slot (boot-check has not run yet). `booted`: the running slot, if known."""
    entry = ctx.journal.get(COMPONENT)
    phase = entry.get("phase")
    if phase == "trial":
        raise TrialInProgress()
    if phase == "staged":
        if booted is None:
            booted = bootloader(ctx).booted()
        if booted is not None and booted == entry.get("slot"):
            raise TrialInProgress()


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

SLOT_HINT = "check [slots] in ota.conf"


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
        got, _n = blockdev.hash_fd(fd, image.raw_size)
    finally:
        os.close(fd)
    if got != image.raw_sha256:
        return [
            f"slot {slot}: content sha256 {got[:12]}… is not the image's {image.raw_sha256[:12]}…"
        ]
    return []


def _write_slot(
    ctx: OtaContext, image: ImageComponent, blob: Path, blob_size: int, device: str
) -> None:
    """The image writer, fed from the stored blob; journal `verifying` before the head."""

    def progress(done: int) -> None:
        ctx.emit("progress", {"phase": "write", "bytes": done, "total": image.raw_size})

    before = [0]

    def on_durable(done: int) -> None:
        if before[0] * 2 < image.raw_size <= done * 2:
            durable.crash_point("base:mid-write")
        before[0] = done

    fd, direct = blockdev.open_for_writing(device)
    try:
        writer = image_writer.ImageWriter(
            fd, direct, image, blob_size, progress=progress, on_durable=on_durable
        )
        with blob.open("rb", buffering=0) as f, image_writer.FileSource(f) as source:
            writer.stream(source)
        writer.write_ends()
        progress(image.raw_size)
        _set(ctx, "verifying")
        writer.check_ends()
        ctx.emit("progress", {"phase": "verify", "bytes": image.raw_size, "total": image.raw_size})
    finally:
        os.close(fd)


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
    if blockdev.mounted(device):
        raise VerificationError(f"slot device {device} is mounted", "unmount it first")
    fd = blockdev.open_exclusive(device, os.O_RDONLY, SLOT_HINT)
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
        blockdev.zero_head(device, HEAD)
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
    check_no_trial(ctx, boot.booted())
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
    ctx.journal.begin(COMPONENT, BasePhase.INVALIDATING, **fields)
    ctx.emit("phase", {"component": COMPONENT, "phase": BasePhase.INVALIDATING})
    try:
        _mark_bad(ctx, boot, slot)
        _set(ctx, "writing")
        _write_slot(ctx, image, ctx.store.path(image.blob), blob_size, device)
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
        raise TrialInProgress()
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
