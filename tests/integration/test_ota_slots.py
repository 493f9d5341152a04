"""The base class on real A/B partitions: a GPT disk on a loop device, real ext4 images,
real grub-editenv, a real kernel mount of the written slot, and SIGKILL at each phase.

The node boots from slot a (kernel command line `smechvisor.slot=a`, saved_entry = a), so
every update goes to slot b. A "reboot" is simulated the way GRUB does it: next_entry is
taken and cleared, and the command line names the slot that was booted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spk_visor.errors import ExitCode, VerificationError
from spk_visor.ota import slots
from spk_visor.ota.context import OtaContext
from spk_visor.ota.durable import CRASH_ENV
from spk_visor.ota.journal import TERMINAL
from spk_visor.ota.nodeconf import SYSROOT_ENV
from tests.support import ota_slots_worker as node
from tests.support.abdisk import AbDisk, ab_disk
from tests.support.prereq import need_command, need_root

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AbDisk]:
    need_root()
    need_command("sfdisk", "fdisk")
    need_command("losetup", "util-linux")
    need_command("partx", "util-linux")
    need_command("grub-editenv", "grub-common")
    need_command("mkfs.ext4", "e2fsprogs")
    need_command("mount", "mount")
    with ab_disk(tmp_path_factory.mktemp("abdisk")) as d:
        yield d


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, disk: AbDisk) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    return {v: node.ext4_image(d / f"{v}.img", f"release {v}") for v in ("v1", "v2")}


@pytest.fixture
def ctx(tmp_path: Path, disk: AbDisk) -> OtaContext:
    return node.node(tmp_path / "root", disk.root_a, disk.root_b)


@contextlib.contextmanager
def mounted(device: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-o", "ro", "-t", "ext4", device, str(where)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True, timeout=30)


def mounts(device: str, where: Path) -> bool:
    """Whether the kernel accepts the slot as an ext4 filesystem (a read-only try)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-o", "ro", "-t", "ext4", device, str(where)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if done.returncode == 0:
        subprocess.run(["umount", str(where)], check=False, capture_output=True, timeout=30)
        return True
    return False


def device_sha256(device: str, size: int) -> str:
    """Hash the device independently of slots.py (a plain buffered read)."""
    digest = hashlib.sha256()
    left = size
    with open(device, "rb") as f:
        while left:
            chunk = f.read(min(1 << 22, left))
            assert chunk, "device shorter than the image"
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def snapshot(ctx: OtaContext) -> tuple[bytes, bytes, bytes]:
    """state.json, grubenv and the first MiB of slot b: what a no-op must leave alone."""
    with open(ctx.config.slots.b, "rb") as f:
        head = f.read(slots.HEAD)
    return (
        ctx.paths.journal.read_bytes() if ctx.paths.journal.exists() else b"",
        Path(ctx.config.slots.grubenv).read_bytes(),
        head,
    )


def worker(
    ctx: OtaContext, *args: str, crash_at: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, SYSROOT_ENV: str(ctx.paths.sysroot)}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "tests.support.ota_slots_worker", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def install_check(ctx: OtaContext, name: str, body: str) -> Path:
    d = ctx.paths.health_d / "required"
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def reboot_into(ctx: OtaContext) -> str:
    """GRUB's part of a reboot: consume the one-shot, boot what it named."""
    chosen = node.consume_oneshot(ctx.paths.sysroot)
    slot = "b" if chosen == node.ENTRY_B else "a"
    node.set_booted(ctx.paths.sysroot, slot)
    return slot


# -- staging -----------------------------------------------------------------------------


def test_stage_writes_the_inactive_slot_and_sets_the_oneshot(
    ctx: OtaContext, images: dict[str, Path], disk: AbDisk, tmp_path: Path
) -> None:
    pub = node.publish(ctx, images["v1"])
    events: list[tuple[str, dict[str, object]]] = []
    ctx.emit = lambda event, fields: events.append((event, fields))

    assert slots.inactive_slot(ctx) == "b"
    rc = slots.stage(ctx, pub.manifest, pub.manifest_hex)
    assert rc == ExitCode.REBOOT_REQUIRED and int(rc) == 4

    env = node.grub_vars(ctx.paths.sysroot)
    assert env["next_entry"] == node.ENTRY_B
    assert env["saved_entry"] == node.ENTRY_A  # default unchanged
    assert device_sha256(disk.root_b, pub.raw_size) == pub.raw_sha256
    assert slots.verify_installed(ctx, pub.manifest.image, "b") == []  # type: ignore[arg-type]
    assert slots.verify_installed(ctx, pub.manifest.image, "a") != []  # type: ignore[arg-type]
    entry = ctx.journal.get("base")
    assert entry["phase"] == "staged" and entry["slot"] == "b"
    assert entry["manifest"] == pub.manifest_hex
    with mounted(disk.root_b, tmp_path / "mnt") as mnt:
        assert (mnt / "release.txt").read_text() == "release v1\n"
    writes = [int(str(f["bytes"])) for e, f in events if e == "progress" and f["phase"] == "write"]
    assert writes == sorted(writes) and writes[-1] == pub.raw_size
    phases = [f["phase"] for e, f in events if e == "phase"]
    assert phases == ["invalidating", "writing", "verifying", "staged"]


def test_stage_refuses_a_mounted_slot_without_changing_anything(
    ctx: OtaContext, images: dict[str, Path], disk: AbDisk, tmp_path: Path
) -> None:
    pub = node.publish(ctx, images["v1"])
    assert slots.stage(ctx, pub.manifest, pub.manifest_hex) == 4
    pub2 = node.publish(ctx, images["v2"], version="2.6.0", counter=2060000)
    before = snapshot(ctx)
    with mounted(disk.root_b, tmp_path / "mnt"), pytest.raises(VerificationError) as e:
        slots.stage(ctx, pub2.manifest, pub2.manifest_hex)
    assert e.value.exit_code == ExitCode.REFUSED
    assert "mounted" in e.value.message
    assert snapshot(ctx) == before


@pytest.mark.parametrize("tamper", ["byte-flip", "over-raw-size"])
def test_bad_image_is_refused_and_never_made_bootable(
    ctx: OtaContext, images: dict[str, Path], disk: AbDisk, tmp_path: Path, tamper: str
) -> None:
    # A good v1 staged first: the refused v2 must also undo v1's one-shot (same slot).
    good = node.publish(ctx, images["v1"])
    assert slots.stage(ctx, good.manifest, good.manifest_hex) == 4
    if tamper == "byte-flip":
        bad = node.publish(ctx, images["v2"], version="2.6.0", counter=2060000)
        blob = ctx.store.path(bad.blob_id)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))
        expect = "signed hash"
    else:
        # The manifest claims 4 KiB less than the image decodes to (and the hash of
        # that prefix, so only the size bound can catch it).
        raw = images["v2"].read_bytes()
        short = len(raw) - 4096
        bad = node.publish(
            ctx,
            images["v2"],
            version="2.6.0",
            counter=2060000,
            raw_size=short,
            raw_sha256=hashlib.sha256(raw[:short]).hexdigest(),
        )
        expect = "more than its signed raw_size"
    with pytest.raises(VerificationError) as e:
        slots.stage(ctx, bad.manifest, bad.manifest_hex)
    assert e.value.exit_code == 3
    assert expect in e.value.message
    env = node.grub_vars(ctx.paths.sysroot)
    assert "next_entry" not in env
    assert env["saved_entry"] == node.ENTRY_A
    entry = ctx.journal.get("base")
    assert entry["phase"] == "failed" and expect in entry["reason"]
    assert not mounts(disk.root_b, tmp_path / "mnt")
    assert slots.recover(ctx) == []


def test_discard_cancels_a_staged_base(ctx: OtaContext, images: dict[str, Path]) -> None:
    pub = node.publish(ctx, images["v1"])
    assert slots.stage(ctx, pub.manifest, pub.manifest_hex) == 4
    assert slots.discard(ctx) == ExitCode.OK
    env = node.grub_vars(ctx.paths.sysroot)
    assert "next_entry" not in env and env["saved_entry"] == node.ENTRY_A
    assert ctx.journal.phase("base") == "discarded"
    # A reboot now boots the default, and boot-check finds nothing to judge.
    assert reboot_into(ctx) == "a"
    before = snapshot(ctx)
    assert slots.boot_check(ctx) == ExitCode.OK
    assert snapshot(ctx) == before


# -- boot check --------------------------------------------------------------------------


def test_boot_check_commits_a_healthy_trial(ctx: OtaContext, images: dict[str, Path]) -> None:
    pub = node.publish(ctx, images["v1"], counter=2050000, set_floor=2040000)
    assert slots.stage(ctx, pub.manifest, pub.manifest_hex) == 4
    # Not rebooted yet: nothing to judge, nothing written.
    before = snapshot(ctx)
    assert slots.boot_check(ctx) == ExitCode.OK
    assert snapshot(ctx) == before

    ran = ctx.paths.sysroot / "check-ran"
    install_check(ctx, "10-ok", f'echo "$SPK_VISOR_OTA_SLOT" > {ran}\nexit 0')
    assert reboot_into(ctx) == "b"
    assert slots.booted_slot(ctx) == "b"
    assert slots.boot_check(ctx) == ExitCode.OK

    assert ran.read_text() == "b\n"
    env = node.grub_vars(ctx.paths.sysroot)
    assert env["saved_entry"] == node.ENTRY_B and "next_entry" not in env
    assert ctx.floor.read()["counter_floor"] == 2040000
    installed = json.loads((ctx.paths.state_dir / "installed.json").read_text())
    assert installed["base"]["slot"] == "b"
    assert installed["base"]["raw_sha256"] == pub.raw_sha256
    assert installed["counter"] == 2050000 and installed["manifest"] == pub.manifest_hex
    assert ctx.journal.phase("base") == "committed"
    # The next boot (from b, the default now) has nothing pending.
    before = snapshot(ctx)
    assert slots.boot_check(ctx) == ExitCode.OK
    assert snapshot(ctx) == before


def test_failed_health_check_keeps_the_old_default(
    ctx: OtaContext, images: dict[str, Path]
) -> None:
    pub = node.publish(ctx, images["v1"])
    assert slots.stage(ctx, pub.manifest, pub.manifest_hex) == 4
    install_check(ctx, "10-ok", "exit 0")
    install_check(ctx, "20-broken", "echo 'control plane down' >&2\nexit 3")
    assert reboot_into(ctx) == "b"

    rc = slots.boot_check(ctx)
    assert rc == ExitCode.ROLLED_BACK and int(rc) == 5

    entry = ctx.journal.get("base")
    assert entry["phase"] == "trial_failed"
    assert len(entry["failures"]) == 1
    assert "20-broken" in entry["failures"][0] and "control plane down" in entry["failures"][0]
    env = node.grub_vars(ctx.paths.sysroot)
    assert env["saved_entry"] == node.ENTRY_A and "next_entry" not in env
    assert not (ctx.paths.state_dir / "installed.json").exists()
    assert ctx.floor.read()["counter_floor"] == 0
    # The caller reboots: GRUB takes the old default, and that boot is quiet.
    assert reboot_into(ctx) == "a"
    assert slots.boot_check(ctx) == ExitCode.OK
    assert ctx.journal.phase("base") == "trial_failed"


def test_callable_health_failure_fails_the_trial(ctx: OtaContext, images: dict[str, Path]) -> None:
    pub = node.publish(ctx, images["v1"])
    assert slots.stage(ctx, pub.manifest, pub.manifest_hex) == 4
    reboot_into(ctx)
    assert slots.boot_check(ctx, health=lambda: ["smechvisord: /api/health not ready"]) == 5
    assert node.grub_vars(ctx.paths.sysroot)["saved_entry"] == node.ENTRY_A


def test_lost_trial_boot_is_rolled_back(ctx: OtaContext, images: dict[str, Path]) -> None:
    """A reset during the trial boot lands on the old default, which notices."""
    pub = node.publish(ctx, images["v1"])
    assert slots.stage(ctx, pub.manifest, pub.manifest_hex) == 4
    node.consume_oneshot(ctx.paths.sysroot)  # GRUB took the one-shot ...
    node.set_booted(ctx.paths.sysroot, "a")  # ... but the next boot is the default again
    assert slots.boot_check(ctx) == ExitCode.OK
    entry = ctx.journal.get("base")
    assert entry["phase"] == "rolled_back" and "interrupted" in entry["reason"]
    assert node.grub_vars(ctx.paths.sysroot)["saved_entry"] == node.ENTRY_A


# -- crash matrix ------------------------------------------------------------------------

STAGE_CRASHES = [
    "base:invalidating",
    "base:writing",
    "base:mid-write",
    "base:verifying",
    "base:oneshot-set",
    "base:staged",
]


@pytest.mark.parametrize("crash_at", STAGE_CRASHES)
def test_stage_crash_then_recover(
    ctx: OtaContext, images: dict[str, Path], disk: AbDisk, tmp_path: Path, crash_at: str
) -> None:
    # v1 staged and bootable in slot b; v2 is being staged over it when the power goes.
    v1 = node.publish(ctx, images["v1"])
    assert slots.stage(ctx, v1.manifest, v1.manifest_hex) == 4
    v2 = node.publish(ctx, images["v2"], version="2.6.0", counter=2060000)
    done = worker(ctx, "stage", str(v2.write(tmp_path / "v2.json")), crash_at=crash_at)
    assert done.returncode == -9, done.stdout + done.stderr  # killed at the crash point
    # Even before recovery: the one-shot that named v1's slot is gone from invalidating
    # on, and comes back only once v2 read back right.
    oneshot = node.grub_vars(ctx.paths.sysroot).get("next_entry")
    if crash_at in ("base:oneshot-set", "base:staged"):
        assert oneshot == node.ENTRY_B
        assert device_sha256(disk.root_b, v2.raw_size) == v2.raw_sha256
    elif crash_at != "base:invalidating":
        assert oneshot is None
    if crash_at == "base:mid-write":
        # The head is written last: a half-written slot holds no filesystem even before
        # recovery runs.
        assert not mounts(disk.root_b, tmp_path / "mnt")

    rec = worker(ctx, "recover")
    assert rec.returncode == 0, rec.stderr

    entry = ctx.journal.get("base")
    env = node.grub_vars(ctx.paths.sysroot)
    assert env["saved_entry"] == node.ENTRY_A
    if crash_at == "base:staged":
        assert entry["phase"] == "staged"
        assert env["next_entry"] == node.ENTRY_B
    else:
        assert entry["phase"] in TERMINAL and entry["phase"] == "failed"
        assert "next_entry" not in env
        assert not mounts(disk.root_b, tmp_path / "mnt")
    # The invariant: a one-shot only ever names a slot whose content verifies.
    if "next_entry" in env:
        assert device_sha256(disk.root_b, v2.raw_size) == v2.raw_sha256
    # A second recovery is a no-op, byte for byte.
    before = snapshot(ctx)
    assert slots.recover(ctx) == []
    assert snapshot(ctx) == before
    # And the node can stage again.
    assert slots.stage(ctx, v2.manifest, v2.manifest_hex) == 4
    assert device_sha256(disk.root_b, v2.raw_size) == v2.raw_sha256


@pytest.mark.parametrize("crash_at", ["base:trial", "base:default-set"])
def test_boot_check_crash(
    ctx: OtaContext, images: dict[str, Path], tmp_path: Path, crash_at: str
) -> None:
    """Killed during the trial: a second boot-check of the same boot fails it (an
    unfinished trial is a failed one). Killed after the default was switched: it rolls
    the commit forward, so installed.json and the floor agree with GRUB."""
    pub = node.publish(ctx, images["v1"])
    assert slots.stage(ctx, pub.manifest, pub.manifest_hex) == 4
    install_check(ctx, "10-ok", "exit 0")
    reboot_into(ctx)
    assert worker(ctx, "boot-check", crash_at=crash_at).returncode == -9
    again = worker(ctx, "boot-check")
    env = node.grub_vars(ctx.paths.sysroot)
    if crash_at == "base:trial":
        assert again.returncode == 5
        assert ctx.journal.phase("base") == "trial_failed"
        assert env["saved_entry"] == node.ENTRY_A
    else:
        assert again.returncode == 0
        assert ctx.journal.phase("base") == "committed"
        assert env["saved_entry"] == node.ENTRY_B
        assert ctx.installed.read()["base"]["slot"] == "b"
        assert ctx.floor.read()["counter_floor"] == pub.manifest.release.set_floor
    before = snapshot(ctx)
    assert worker(ctx, "boot-check").returncode == 0
    assert snapshot(ctx) == before


def test_discard_via_worker_after_crash_recovers(
    ctx: OtaContext, images: dict[str, Path], tmp_path: Path
) -> None:
    v1 = node.publish(ctx, images["v1"])
    done = worker(ctx, "stage", str(v1.write(tmp_path / "v1.json")), crash_at="base:writing")
    assert done.returncode == -9
    assert worker(ctx, "discard").returncode == 0
    assert ctx.journal.phase("base") == "failed"
    assert "next_entry" not in node.grub_vars(ctx.paths.sysroot)
