"""The one tool runner: every tool bounded in time, every exit status looked at, and the
shim build's ldd and cpio | gzip run through it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from spk_visor.deploy import shim_iso
from spk_visor.install import runner

PY = sys.executable


class ToolFailed(Exception):
    pass


def test_run_checked_returns_stdout_and_raises_with_the_tools_last_words() -> None:
    assert runner.run_checked([PY, "-c", "print('hi')"], ToolFailed, timeout=30) == "hi\n"
    with pytest.raises(ToolFailed, match=r"failed \(3\): .*disk on fire"):
        runner.run_checked(
            [PY, "-c", "import sys; sys.stderr.write('disk on fire'); sys.exit(3)"],
            ToolFailed,
            timeout=30,
        )


def test_run_checked_times_out() -> None:
    t0 = time.monotonic()
    with pytest.raises(ToolFailed, match="timed out"):
        runner.run_checked([PY, "-c", "import time; time.sleep(30)"], ToolFailed, timeout=0.5)
    assert time.monotonic() - t0 < 15


def test_succeeds_is_false_for_failure_timeout_and_a_missing_tool(tmp_path: Path) -> None:
    assert runner.succeeds([PY, "-c", "pass"], timeout=30)
    assert not runner.succeeds([PY, "-c", "raise SystemExit(1)"], timeout=30)
    assert not runner.succeeds([PY, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert not runner.succeeds([str(tmp_path / "no-such-tool")], timeout=30)


def _meet(here: Path, there: Path, rc: int = 0) -> list[str]:
    """A tool that leaves `here`, then waits (bounded) for `there`: two of them both
    succeed only when they run at the same time."""
    code = (
        "import pathlib, sys, time\n"
        f"pathlib.Path({str(here)!r}).touch()\n"
        "deadline = time.monotonic() + 5\n"
        f"while not pathlib.Path({str(there)!r}).exists():\n"
        "    if time.monotonic() > deadline: sys.exit(9)\n"
        "    time.sleep(0.02)\n"
        f"sys.stderr.write('done'); sys.exit({rc})\n"
    )
    return [PY, "-c", code]


def test_succeeds_each_runs_the_tools_at_once_and_answers_in_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    missing = [str(tmp_path / "no-such-tool")]
    assert runner.succeeds_each([_meet(a, b), missing, _meet(b, a)], timeout=30) == [
        True,
        False,
        True,
    ]
    assert runner.succeeds_each([], timeout=30) == []


def test_run_all_runs_at_once_and_raises_the_first_failure_once_all_ended(
    tmp_path: Path,
) -> None:
    a, b, c, d = (tmp_path / n for n in "abcd")
    ok = [PY, "-c", "print('out')"]
    assert runner.run_all([_meet(a, b), ok, _meet(b, a)], ToolFailed, timeout=30) == [
        "",
        "out\n",
        "",
    ]
    with pytest.raises(ToolFailed, match=r"failed \(4\): done") as caught:
        runner.run_all([_meet(c, d, rc=4), _meet(d, c, rc=5)], ToolFailed, timeout=30)
    # The second (failing too, later in argv order) ran to its end alongside the first.
    assert d.exists() and "(5)" not in str(caught.value)


def test_pipeline_checks_both_ends_and_a_shared_deadline(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"abc")
    out = tmp_path / "out"
    with src.open("rb") as i, out.open("wb") as o:
        runner.pipeline(["cat"], ["cat"], ToolFailed, timeout=30, stdin=i, stdout=o)
    assert out.read_bytes() == b"abc"
    with src.open("rb") as i, out.open("wb") as o, pytest.raises(ToolFailed, match="failed"):
        runner.pipeline(
            [PY, "-c", "raise SystemExit(2)"], ["cat"], ToolFailed, timeout=30, stdin=i, stdout=o
        )
    t0 = time.monotonic()
    with src.open("rb") as i, out.open("wb") as o, pytest.raises(ToolFailed, match="timed out"):
        runner.pipeline(
            ["cat"],
            [PY, "-c", "import time; time.sleep(30)"],
            ToolFailed,
            timeout=0.5,
            stdin=i,
            stdout=o,
        )
    assert time.monotonic() - t0 < 15


def test_the_shim_builds_ldd_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ldd that hangs (a broken loader, a FUSE path) stops the build with a reason
    instead of hanging it forever."""
    fake = tmp_path / "bin" / "ldd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(shim_iso, "LDD_TIMEOUT_S", 0.5)
    stage = shim_iso._Stage(tmp_path / "stage")
    t0 = time.monotonic()
    with pytest.raises(shim_iso.ShimBuildError, match="timed out"):
        stage.add_libs(Path(PY))
    assert time.monotonic() - t0 < 15


def test_the_shim_builds_cpio_and_gzip_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "gzip"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\ncat >/dev/null\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    stage = tmp_path / "stage"
    (stage / "etc").mkdir(parents=True)
    (stage / "etc" / "hostname").write_text("x\n")
    with pytest.raises(shim_iso.ShimBuildError, match="gzip failed"):
        shim_iso._pack(stage, tmp_path / "initrd.img", "gzip")
