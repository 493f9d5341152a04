"""The base class's logic without root: slots are plain files here (the integration test
uses real partitions), grubenv is real (grub-editenv), health checks are real scripts."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import zstandard

from spk_visor.errors import ConfigError, ExitCode, VerificationError
from spk_visor.install import blockdev
from spk_visor.install import image as image_writer
from spk_visor.ota import engine, slots
from spk_visor.ota.context import OtaContext
from spk_visor.trust.manifest import MANIFEST_TYPE, Manifest, parse
from tests.support import ota_slots_worker as node
from tests.support.prereq import need_command

SLOT_BYTES = 4 << 20


@pytest.fixture
def ctx(tmp_path: Path) -> OtaContext:
    need_command("grub-editenv", "grub-common")
    for name in ("slot-a", "slot-b"):
        with (tmp_path / name).open("wb") as f:
            f.truncate(SLOT_BYTES)
    return node.node(tmp_path / "root", str(tmp_path / "slot-a"), str(tmp_path / "slot-b"))


def raw_image(size: int, seed: int = 1) -> bytes:
    """Something image-like: a pseudo-random part, then zeros."""
    noise = hashlib.shake_256(seed.to_bytes(4, "big")).digest(size // 2)
    return noise + bytes(size - len(noise))


def put(
    ctx: OtaContext,
    raw: bytes,
    blob: bytes,
    encoding: str = "zstd",
    raw_size: int | None = None,
    raw_sha256: str | None = None,
) -> tuple[Manifest, str]:
    blob_id = "sha256:" + hashlib.sha256(blob).hexdigest()
    ctx.store.ensure()
    ctx.store.path(blob_id).write_bytes(blob)
    payload = {
        "type": MANIFEST_TYPE,
        "product": "smechvisor",
        "compatible": ["smechvisor/x86_64"],
        "release": {"version": "3.0.0", "counter": 3000000, "set_floor": 2900000},
        "components": {
            "base": {
                "class": "image",
                "version": "3.0.0",
                "image": {
                    "blob": blob_id,
                    "encoding": encoding,
                    "raw_size": len(raw) if raw_size is None else raw_size,
                    "raw_sha256": raw_sha256 or hashlib.sha256(raw).hexdigest(),
                },
            }
        },
        "blobs": [{"id": blob_id, "size": len(blob)}],
    }
    doc = json.dumps(payload, sort_keys=True).encode()
    return parse(payload), hashlib.sha256(doc).hexdigest()


def slot_bytes(ctx: OtaContext, slot: str, n: int) -> bytes:
    with open(ctx.config.slots.device(slot), "rb") as f:
        return f.read(n)


# -- slots and the kernel command line ---------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "want"),
    [
        ("root=/dev/sda2 smechvisor.slot=b quiet", "b"),
        ("smechvisor.slot=a", "a"),
        ("smechvisor.slot=c", None),
        ("smechvisor.slots=a", None),
        ("root=/dev/sda2 quiet", None),
    ],
)
def test_booted_slot_reads_the_kernel_command_line(
    ctx: OtaContext, cmdline: str, want: str | None
) -> None:
    (ctx.paths.sysroot / "proc" / "cmdline").write_text(cmdline + "\n")
    assert slots.booted_slot(ctx) == want


def test_inactive_slot_falls_back_to_the_default_then_refuses(ctx: OtaContext) -> None:
    node.set_booted(ctx.paths.sysroot, "b")
    assert slots.inactive_slot(ctx) == "a"
    (ctx.paths.sysroot / "proc" / "cmdline").unlink()
    assert slots.inactive_slot(ctx) == "b"  # saved_entry names a
    node.editenv(node.grubenv_path(ctx.paths.sysroot), "unset", "saved_entry")
    with pytest.raises(ConfigError):
        slots.inactive_slot(ctx)


# -- decoding, bounds and identity --------------------------------------------------------


def test_multi_frame_zstd_and_identity_both_stage(ctx: OtaContext) -> None:
    raw = raw_image(3 << 20)
    cctx = zstandard.ZstdCompressor(level=1)
    # Two frames back to back, as a parallel encoder (pzstd) writes them.
    blob = cctx.compress(raw[: 1 << 20]) + cctx.compress(raw[1 << 20 :])
    manifest, mhex = put(ctx, raw, blob)
    assert slots.stage(ctx, manifest, mhex) == ExitCode.REBOOT_REQUIRED
    assert slot_bytes(ctx, "b", len(raw)) == raw

    raw2 = raw_image(2 << 20, seed=2)
    manifest2, mhex2 = put(ctx, raw2, raw2, encoding="identity")
    assert slots.stage(ctx, manifest2, mhex2) == ExitCode.REBOOT_REQUIRED
    assert slot_bytes(ctx, "b", len(raw2)) == raw2
    assert slots.verify_installed(ctx, manifest2.image, "b") == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("longer", "more than its signed raw_size"),
        ("shorter", "its signed raw_size is"),
        ("wrong-raw-hash", "raw_sha256"),
        ("not-zstd", "does not decode"),
    ],
)
def test_bad_streams_are_refused_and_leave_no_filesystem(
    ctx: OtaContext, case: str, reason: str
) -> None:
    raw = raw_image(3 << 20)
    cctx = zstandard.ZstdCompressor(level=1)
    if case == "longer":
        manifest, mhex = put(ctx, raw, cctx.compress(raw), raw_size=len(raw) - 1)
    elif case == "shorter":
        manifest, mhex = put(ctx, raw, cctx.compress(raw[:-512]))
    elif case == "wrong-raw-hash":
        manifest, mhex = put(ctx, raw, cctx.compress(raw), raw_sha256="0" * 64)
    else:
        manifest, mhex = put(ctx, raw, b"\x00" * 4096 + raw[:4096])
    # Something that looks like a filesystem head sits in the slot before the attempt.
    with open(ctx.config.slots.b, "r+b") as f:
        f.write(b"\xaa" * 4096)
    with pytest.raises(VerificationError) as e:
        slots.stage(ctx, manifest, mhex)
    assert reason in e.value.message
    assert slot_bytes(ctx, "b", slots.HEAD) == bytes(slots.HEAD)
    assert "next_entry" not in node.grub_vars(ctx.paths.sysroot)
    assert ctx.journal.phase("base") == "failed"


def test_head_is_written_last(ctx: OtaContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the body streams, the slot's first MiB stays zero (no mountable filesystem)."""
    raw = raw_image(3 << 20)
    manifest, mhex = put(ctx, raw, zstandard.ZstdCompressor().compress(raw))
    seen: list[bytes] = []

    def spy(event: str, fields: dict[str, object]) -> None:
        if event == "progress" and fields["phase"] == "write":
            seen.append(slot_bytes(ctx, "b", 64))

    ctx.emit = spy
    monkeypatch.setattr(image_writer, "CHUNK", 1 << 20)
    assert slots.stage(ctx, manifest, mhex) == ExitCode.REBOOT_REQUIRED
    # Two 1 MiB body windows with a zero head, then the head last of all.
    assert seen == [bytes(64), bytes(64), raw[:64]]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("size", [100, 1 << 20, (1 << 20) + 4096 + 17, (3 << 20) + 1234])
def test_odd_sizes_land_exactly(
    ctx: OtaContext, monkeypatch: pytest.MonkeyPatch, size: int, direct: bool
) -> None:
    """Head, windows and an unaligned tail add up to the image, byte for byte, with
    O_DIRECT and without it (devices that refuse O_DIRECT)."""
    monkeypatch.setattr(image_writer, "CHUNK", 1 << 20)
    used: list[bool] = []
    real_open = blockdev.open_for_writing

    def open_for_writing(device: str) -> tuple[int, bool]:
        if direct:
            fd, is_direct = real_open(device)
        else:
            fd, is_direct = blockdev.open_exclusive(device, os.O_RDWR), False
        used.append(is_direct)
        return fd, is_direct

    monkeypatch.setattr(blockdev, "open_for_writing", open_for_writing)
    raw = raw_image(size, seed=size)
    manifest, mhex = put(ctx, raw, zstandard.ZstdCompressor().compress(raw))
    assert slots.stage(ctx, manifest, mhex) == ExitCode.REBOOT_REQUIRED
    assert slot_bytes(ctx, "b", size) == raw
    assert used == [direct]


@pytest.mark.parametrize("where", ["body", "head"])
def test_a_slot_that_reads_back_wrong_is_refused(
    ctx: OtaContext, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The device returning other bytes than were written (a failing disk) is caught."""
    monkeypatch.setattr(image_writer, "CHUNK", 1 << 20)
    raw = raw_image(3 << 20)
    manifest, mhex = put(ctx, raw, zstandard.ZstdCompressor().compress(raw))
    real = blockdev.pread_into

    def flaky(fd: int, view: memoryview, offset: int) -> int:
        n = real(fd, view, offset)
        if (offset == 2 << 20) if where == "body" else (offset == 0):
            view[100] ^= 0xFF
        return n

    monkeypatch.setattr(blockdev, "pread_into", flaky)
    with pytest.raises(VerificationError, match="reads back other bytes"):
        slots.stage(ctx, manifest, mhex)
    assert "next_entry" not in node.grub_vars(ctx.paths.sysroot)
    assert ctx.journal.phase("base") == "failed"
    assert slot_bytes(ctx, "b", slots.HEAD) == bytes(slots.HEAD)


def test_staging_the_staged_release_again_rewrites_nothing(ctx: OtaContext) -> None:
    raw = raw_image(2 << 20)
    manifest, mhex = put(ctx, raw, zstandard.ZstdCompressor().compress(raw))
    assert slots.stage(ctx, manifest, mhex) == ExitCode.REBOOT_REQUIRED
    before = (ctx.paths.journal.read_bytes(), Path(ctx.config.slots.b).stat().st_mtime_ns)
    assert slots.stage(ctx, manifest, mhex) == ExitCode.REBOOT_REQUIRED
    assert (ctx.paths.journal.read_bytes(), Path(ctx.config.slots.b).stat().st_mtime_ns) == before
    # Once the one-shot is gone (discarded by hand), the same release is written again.
    node.editenv(node.grubenv_path(ctx.paths.sysroot), "unset", "next_entry")
    phases: list[object] = []
    ctx.emit = lambda event, fields: phases.append(fields["phase"]) if event == "phase" else None
    assert slots.stage(ctx, manifest, mhex) == ExitCode.REBOOT_REQUIRED
    assert phases == ["invalidating", "writing", "verifying", "staged"]
    assert node.grub_vars(ctx.paths.sysroot)["next_entry"] == node.ENTRY_B


def test_image_larger_than_the_slot_is_refused_before_any_change(ctx: OtaContext) -> None:
    raw = raw_image(SLOT_BYTES + 4096)
    manifest, mhex = put(ctx, raw, zstandard.ZstdCompressor().compress(raw))
    with pytest.raises(VerificationError, match="does not fit"):
        slots.stage(ctx, manifest, mhex)
    assert not ctx.paths.journal.exists()


def test_stage_refuses_during_a_trial_and_onto_the_default(ctx: OtaContext) -> None:
    raw = raw_image(1 << 20)
    manifest, mhex = put(ctx, raw, raw, encoding="identity")
    assert slots.stage(ctx, manifest, mhex) == ExitCode.REBOOT_REQUIRED
    # Booted into the staged slot, boot-check not run yet.
    node.consume_oneshot(ctx.paths.sysroot)
    node.set_booted(ctx.paths.sysroot, "b")
    with pytest.raises(slots.TrialInProgress):
        slots.stage(ctx, manifest, mhex)
    ctx.journal.set("base", "trial")
    with pytest.raises(slots.TrialInProgress):
        slots.discard(ctx)
    # Journal quiet, but the node runs b while the default is still a: writing a, the
    # only known-good slot, is refused.
    ctx.journal.set("base", "trial_failed")
    with pytest.raises(VerificationError, match="default"):
        slots.stage(ctx, manifest, mhex)


def test_a_trial_in_progress_is_one_error_with_one_exit_code(ctx: OtaContext) -> None:
    """Wherever it is noticed (stage, discard, an apply's preconditions, the worker's
    daemon step), a base trial boot in progress is the same error: busy, exit 6."""
    raw = raw_image(1 << 20)
    manifest, mhex = put(ctx, raw, raw, encoding="identity")
    assert slots.stage(ctx, manifest, mhex) == ExitCode.REBOOT_REQUIRED
    node.consume_oneshot(ctx.paths.sysroot)
    node.set_booted(ctx.paths.sysroot, "b")
    ctx.journal.set("base", "trial")
    for attempt in (
        lambda: slots.stage(ctx, manifest, mhex),
        lambda: slots.discard(ctx),
        lambda: engine.check_preconditions(ctx),
    ):
        with pytest.raises(slots.TrialInProgress) as e:
            attempt()
        assert e.value.exit_code == ExitCode.BUSY
        assert e.value.message == "a base trial boot is in progress"


# -- recovery -----------------------------------------------------------------------------


def test_recover_clears_a_oneshot_no_staged_base_backs(ctx: OtaContext) -> None:
    env = node.grubenv_path(ctx.paths.sysroot)
    node.editenv(env, "set", f"next_entry={node.ENTRY_B}")
    assert slots.recover(ctx) != []
    assert "next_entry" not in node.grub_vars(ctx.paths.sysroot)
    before = env.read_bytes()
    assert slots.recover(ctx) == []
    assert env.read_bytes() == before


def test_recover_with_nothing_pending_writes_nothing(ctx: OtaContext) -> None:
    env = node.grubenv_path(ctx.paths.sysroot)
    before = env.stat().st_mtime_ns
    assert slots.recover(ctx) == []
    assert slots.boot_check(ctx) == ExitCode.OK
    assert env.stat().st_mtime_ns == before
    assert not ctx.paths.journal.exists()


# -- health checks ------------------------------------------------------------------------


def script(ctx: OtaContext, kind: str, name: str, body: str, mode: int = 0o755) -> None:
    d = ctx.paths.health_d / kind
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text("#!/bin/sh\n" + body + "\n")
    (d / name).chmod(mode)


def test_health_checks_run_in_order_and_report_failures(ctx: OtaContext) -> None:
    log = ctx.paths.sysroot / "order"
    script(ctx, "required", "20-second", f"echo 20 >> {log}")
    script(ctx, "required", "10-first", f"echo 10 >> {log}")
    script(ctx, "required", "30-fails", "echo boom; exit 7")
    script(ctx, "required", "40-not-executable", "exit 1", mode=0o644)
    script(ctx, "required", ".hidden", "exit 1")
    failures = slots.run_health_checks(ctx, "b")
    assert log.read_text() == "10\n20\n"
    assert failures == ["required/30-fails: exit 7: boom"]


def test_a_hanging_check_and_its_children_are_killed(ctx: OtaContext) -> None:
    pidfile = ctx.paths.sysroot / "child.pid"
    script(ctx, "required", "10-hangs", f"sleep 300 & echo $! > {pidfile}; wait")
    t0 = time.monotonic()
    failures = slots.run_health_checks(ctx, "b", timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert failures == ["required/10-hangs: timed out after 0.5 s"]
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the check's child outlived the timeout")
