"""--direct-io of the install-path benches: from the command line to `losetup`.

Each link is checked on its own so a dropped flag fails here, not in a bench's figures:
the option reaches each bench's run(), run() hands it to the loop device it attaches,
and the attach asks losetup for direct I/O, reads DIO back and refuses a device the
kernel left buffered. (tests/integration/test_loop_direct_io.py: the real device.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import deploy, ota_slots, writer_ab
from tests.support import abdisk, loopattach
from tests.support.prereq import need_command

# The benches on an A/B slot disk (bench.deploy has its own target disk).
SLOT_BENCHES: dict[str, Any] = {"ota_slots": ota_slots, "writer_ab": writer_ab}


class _Losetup:
    """Stands in for subprocess.run in loopattach: records each losetup call and
    answers `--list ... DIO` with `dio`."""

    def __init__(self, dio: str) -> None:
        self.dio = dio
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        assert argv[0] == "losetup"
        if "--list" in argv:
            out = f"{self.dio}\n"
        elif "--find" in argv:
            out = "/dev/loop9\n"
        else:
            out = ""
        return subprocess.CompletedProcess(argv, 0, out, "")


def test_attach_with_direct_io_asks_losetup_for_it_and_reads_it_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = _Losetup("1")
    monkeypatch.setattr(subprocess, "run", fake)
    assert loopattach.attach(tmp_path / "x.img", partscan=True, direct_io=True) == "/dev/loop9"
    attach, listing = fake.calls
    assert "--direct-io=on" in attach and "--partscan" in attach
    assert attach[-1] == str(tmp_path / "x.img")
    assert listing[-1] == "/dev/loop9" and "DIO" in listing


def test_attach_without_direct_io_leaves_the_loop_device_buffered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = _Losetup("0")
    monkeypatch.setattr(subprocess, "run", fake)
    assert loopattach.attach(tmp_path / "x.img") == "/dev/loop9"
    assert len(fake.calls) == 1
    assert not any(a.startswith("--direct-io") for a in fake.calls[0])
    assert "--partscan" not in fake.calls[0]


def test_direct_io_the_kernel_left_off_detaches_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # losetup exits 0 when the kernel falls back to buffered I/O: only DIO tells.
    fake = _Losetup("0")
    monkeypatch.setattr(subprocess, "run", fake)
    (tmp_path / "x.img").write_bytes(b"")
    with pytest.raises(loopattach.DirectIoRefused, match="DIO") as got:
        loopattach.attach(tmp_path / "x.img", partscan=True, direct_io=True)
    assert "without --direct-io" in str(got.value)
    assert fake.calls[-1] == ["losetup", "-d", "/dev/loop9"]


@pytest.mark.parametrize("bench", sorted(SLOT_BENCHES))
@pytest.mark.parametrize(("argv", "want"), [(["--direct-io"], True), ([], False)])
def test_the_option_reaches_the_bench_run(
    monkeypatch: pytest.MonkeyPatch, bench: str, argv: list[str], want: bool
) -> None:
    module = SLOT_BENCHES[bench]
    seen: list[bool] = []

    def run(direct_io: bool = False) -> dict[str, object]:
        seen.append(direct_io)
        return {}

    monkeypatch.setattr(module, "run", run)
    monkeypatch.setattr(module.os, "geteuid", lambda: 0)
    assert module.main(argv) == 0
    assert seen == [want]


@pytest.mark.parametrize(("argv", "want"), [(["--direct-io"], True), ([], False)])
def test_the_option_reaches_the_deploy_run(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], want: bool
) -> None:
    seen: list[bool] = []

    def run_deploy(direct_io: bool = False) -> dict[str, object]:
        seen.append(direct_io)
        return {"skipped": "test"}

    monkeypatch.setattr(deploy, "run_deploy", run_deploy)
    assert deploy.main(["--skip-iso", "--skip-channel", *argv]) == 0
    assert seen == [want]


@pytest.mark.parametrize("bench", ["ota_slots", "writer_ab", "deploy"])
def test_a_refused_direct_io_exits_2_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bench: str
) -> None:
    def refused(direct_io: bool = False) -> dict[str, object]:
        raise loopattach.DirectIoRefused("the kernel left direct I/O off")

    module = {**SLOT_BENCHES, "deploy": deploy}[bench]
    monkeypatch.setattr(module, "run_deploy" if bench == "deploy" else "run", refused)
    monkeypatch.setattr(module.os, "geteuid", lambda: 0)
    argv = ["--skip-iso", "--skip-channel"] if bench == "deploy" else []
    with pytest.raises(SystemExit) as got:
        module.main([*argv, "--direct-io"])
    assert got.value.code == 2
    assert "--direct-io: the kernel left direct I/O off" in capsys.readouterr().err


class _Attached(Exception):
    """Raised by the stand-in disks: the bench got as far as attaching its device."""


def _fake_image(work: Path, _size_mib: int) -> Path:
    raw = work / "raw.img"
    raw.write_bytes(b"\0" * 4096)
    return raw


def _fake_encode(_raw: Path, out: Path, threads: int) -> float:
    out.write_bytes(b"zst")
    return 1.0


@pytest.mark.parametrize("want", [True, False])
@pytest.mark.parametrize("bench", sorted(SLOT_BENCHES))
def test_the_bench_run_attaches_its_ab_disk_in_that_mode(
    monkeypatch: pytest.MonkeyPatch, bench: str, want: bool
) -> None:
    seen: list[object] = []

    @contextlib.contextmanager
    def ab_disk(_work: Path, *_a: object, **kw: object) -> Iterator[None]:
        seen.append(kw.get("direct_io", False))
        raise _Attached
        yield

    module = SLOT_BENCHES[bench]
    monkeypatch.setattr(ota_slots, "build_image", _fake_image)
    monkeypatch.setattr(ota_slots, "encode", _fake_encode)
    monkeypatch.setattr(module, "ab_disk", ab_disk)
    with pytest.raises(_Attached):
        module.run(direct_io=want)
    assert seen == [want]


@pytest.mark.parametrize("want", [True, False])
def test_the_deploy_run_attaches_its_target_disk_in_that_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, want: bool
) -> None:
    seen: list[object] = []

    def loop_disk(_work: Path, _size: str, **kw: object) -> None:
        seen.append(kw.get("direct_io", False))
        raise _Attached

    raw = _fake_image(tmp_path, 0)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    monkeypatch.setattr(deploy, "_bytecode", lambda _work: contextlib.nullcontext())
    monkeypatch.setattr(deploy, "_release", lambda *_a: (raw, raw, raw, 0.0, 0.0))
    monkeypatch.setattr(deploy, "LoopDisk", loop_disk)
    with pytest.raises(_Attached):
        deploy.run_deploy(direct_io=want)
    assert seen == [want]


def test_every_bench_offers_the_same_option(capsys: pytest.CaptureFixture[str]) -> None:
    # One definition (bench/loop_mode.py), shown by each bench's --help; a --help that
    # ran the bench instead (as bench.ota_slots' once did) would not exit here.
    for main in (ota_slots.main, writer_ab.main, deploy.main):
        with pytest.raises(SystemExit) as got:
            main(["--help"])
        assert got.value.code == 0
        assert "--direct-io" in capsys.readouterr().out


def test_direct_io_asks_for_the_512_byte_sectors_the_disks_are_laid_out_in(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # On a disk with 4 KiB logical blocks a newer kernel would otherwise give the loop
    # device 4 KiB sectors, and the GPT sfdisk wrote in 512-byte sectors is not found.
    fake = _Losetup("1")
    monkeypatch.setattr(subprocess, "run", fake)
    loopattach.attach(tmp_path / "x.img", partscan=True, direct_io=True)
    attach = fake.calls[0]
    assert attach[attach.index("--sector-size") + 1] == "512"


def test_a_refusal_for_a_disk_with_larger_blocks_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(subprocess, "run", _Losetup("0"))
    monkeypatch.setattr(loopattach, "backing_block_size", lambda _p: 4096)
    with pytest.raises(loopattach.DirectIoRefused) as got:
        loopattach.attach(tmp_path / "x.img", partscan=True, direct_io=True)
    assert "4096-byte logical blocks" in str(got.value)
    assert "512-byte sectors" in str(got.value)


def test_a_refusal_for_a_filesystem_without_o_direct_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(subprocess, "run", _Losetup("0"))
    monkeypatch.setattr(loopattach, "o_direct_ok", lambda _folder: False)
    with pytest.raises(loopattach.DirectIoRefused) as got:
        loopattach.attach(tmp_path / "x.img", direct_io=True)
    assert f"{tmp_path} does not do O_DIRECT" in str(got.value)


class _Built(Exception):
    """Raised by the stand-in image builders: the bench got as far as building."""


def _refuse(*_a: object, **_kw: object) -> str:
    raise loopattach.DirectIoRefused("the kernel left direct I/O off")


def _built(*_a: object, **_kw: object) -> Any:
    raise _Built


@pytest.mark.parametrize("bench", ["ota_slots", "writer_ab", "deploy"])
def test_direct_io_is_probed_before_the_image_is_built(
    monkeypatch: pytest.MonkeyPatch, bench: str
) -> None:
    monkeypatch.setattr(loopattach, "attach", _refuse)
    monkeypatch.setattr(ota_slots, "build_image", _built)
    monkeypatch.setattr(deploy, "_release", _built)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    monkeypatch.setattr(deploy, "_bytecode", lambda _work: contextlib.nullcontext())
    run = deploy.run_deploy if bench == "deploy" else SLOT_BENCHES[bench].run
    with pytest.raises(loopattach.DirectIoRefused):
        run(direct_io=True)
    # Without --direct-io there is nothing to probe: the bench goes on to build.
    with pytest.raises(_Built):
        run(direct_io=False)


def test_deploy_refuses_direct_io_with_the_deploy_skipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(deploy, "run_deploy", _built)
    with pytest.raises(SystemExit) as got:
        deploy.main(["--skip-iso", "--skip-channel", "--skip-deploy", "--direct-io"])
    assert got.value.code == 2
    assert "--direct-io" in capsys.readouterr().err


def test_an_ab_disk_whose_attach_fails_leaves_no_image(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    need_command("sfdisk", "fdisk")
    monkeypatch.setattr(abdisk, "attach", _refuse)
    with (
        pytest.raises(loopattach.DirectIoRefused),
        abdisk.ab_disk(tmp_path, slot_mib=2, esp_mib=1, direct_io=True),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


def test_o_direct_probe_leaves_nothing_and_fails_where_it_cannot_write(tmp_path: Path) -> None:
    # tmp_path may be on a filesystem without O_DIRECT; either way no probe file stays.
    loopattach.o_direct_ok(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert not loopattach.o_direct_ok(tmp_path / "missing")
