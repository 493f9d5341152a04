"""`make run` and `make dist`, run as the README shows them.

`make run` is a development run: it never loads modules or reboots the machine (it logs
what would have run, and its banner says so), and the first CLI command after it,
`spk-visor node`, works in a shell that sourced the run folder's env file. `make dist`
builds the release tree `spk-visor ota build --daemon-tree` packs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import devrun, sysroots
from tests.support.daemon import wait_for
from tests.support.prereq import need_command, need_root
from tests.support.sshd import free_port

REPO = Path(__file__).resolve().parents[2]
MAKE = devrun.MAKE


def clean_env(home: Path) -> dict[str, str]:
    """A user's shell: no SPK_VISOR_*/SMECHVISORD_* settings, a fresh HOME, no venv on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPK_VISOR_", "SMECHVISORD_", "MAKE", "VIRTUAL_ENV"))
    }
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if p != venv_bin)
    env["HOME"] = str(home)
    env.pop("XDG_CONFIG_HOME", None)
    return env


@dataclass
class DevRun:
    make: devrun.MakeRun
    run_root: Path
    env: dict[str, str]

    @property
    def log(self) -> Path:
        return self.make.log

    def shell(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", script],
            cwd=self.run_root.parent,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            check=False,
        )


def start_make_run(tmp_path: Path, *make_vars: str) -> DevRun:
    need_command("make", "make")
    # A checkout's own folder stands in for the user's: short, as AF_UNIX socket paths
    # under .run/run must stay within 107 bytes (pytest's tmp_path is too long).
    run_root = Path(tempfile.mkdtemp(prefix="mkrun", dir="/tmp")) / ".run"
    env = clean_env(tmp_path / "home")
    log = tmp_path / "make-run.log"
    make = devrun.start(REPO, free_port(), env, log, f"RUN_ROOT={run_root}", *make_vars)
    return DevRun(make, run_root, env)


def stop(run: DevRun) -> None:
    run.make.stop()
    shutil.rmtree(run.run_root.parent, ignore_errors=True)


@pytest.fixture
def dev_run(tmp_path: Path) -> Iterator[DevRun]:
    # As root (CI) a development run needs a fixture tree for host facts; as a user it
    # reads this machine's, which no test can predict, so the fixture serves both.
    sysroot = sysroots.build("intel-ready", tmp_path / "sysroot")
    run = start_make_run(tmp_path, f"SYSROOT={sysroot}")
    try:
        run.make.wait_serving()
        yield run
    finally:
        stop(run)


def test_make_run_then_spk_visor_node_as_the_readme_shows(dev_run: DevRun) -> None:
    banner = dev_run.log.read_text()
    assert "a DEVELOPMENT run" in banner
    assert "logged, not run: modprobe, reboot" in banner
    # The README: `make run`, then in another shell `. .run/env` and `spk-visor node`.
    result = dev_run.shell(". .run/env && spk-visor node")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smech-01 (smechvisord" in result.stdout  # the fixture host's name
    assert "no API token" not in result.stderr
    # The token came from the token file, not from the env file's text.
    token = (dev_run.run_root / "token").read_text().strip()
    assert token not in (dev_run.run_root / "env").read_text()


def test_make_run_neither_loads_modules_nor_reboots(dev_run: DevRun) -> None:
    result = dev_run.shell(". .run/env && spk-visor vfio enable && spk-visor reboot-uefi --yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would have run `modprobe vfio-pci`" in result.stdout
    hw_log = (dev_run.run_root / "hw.log").read_text()
    assert "would have run `modprobe vfio-pci` (development run: not run)" in hw_log
    assert "would have run `reboot` (development run: not run)" in hw_log
    wait_for(lambda: "would have run `reboot`" in dev_run.log.read_text(), timeout=10)
    assert dev_run.make.proc.poll() is None, "the daemon is still serving"


def test_make_run_as_root_refuses_this_machines_sysroot(tmp_path: Path) -> None:
    need_root()
    run = start_make_run(tmp_path)
    try:
        code = run.make.proc.wait(timeout=120)
    finally:
        stop(run)
    out = run.log.read_text()
    assert code != 0
    assert "as root, a development run on this machine's sysroot" in out
    assert "SYSROOT=DIR make run" in out and "HW=real make run" in out
    assert run.make.health() is None


def test_make_dist_builds_a_release_tree(tmp_path: Path) -> None:
    need_command("make", "make")
    tree = tmp_path / "dist" / "smechvisord"
    subprocess.run(
        [*MAKE, "dist", f"DIST={tree}", "VERSION=9.8.7", f"NODE_PYTHON={sys.executable}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    launcher = tree / "bin" / "smechvisord"
    assert launcher.stat().st_mode & 0o777 == 0o755
    assert launcher.read_text().startswith(f"#!{sys.executable} -IB\n")
    assert (tree / "VERSION").read_text() == "9.8.7\n"
    assert list(tree.rglob("*.pyc")), "bytecode is compiled at build time"
    version = subprocess.run(
        [str(launcher), "--version"], capture_output=True, text=True, check=True, timeout=60
    )
    assert version.stdout.strip() == "smechvisord 9.8.7"
    # The OTA preflight's own command, from the tree alone.
    check = subprocess.run(
        [str(launcher), "--self-check", "--state-dir", str(tmp_path / "state")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    # 9.8.7, not the checkout's version: the launcher runs the tree's own package.
    assert check.stdout.startswith("smechvisord 9.8.7: self-check ok")


def test_make_dist_refuses_a_version_unsafe_in_a_path(tmp_path: Path) -> None:
    need_command("make", "make")
    result = subprocess.run(
        [*MAKE, "dist", f"DIST={tmp_path / 'd'}", "VERSION=../2.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "version '../2.5' is not of the form 2.5.0" in result.stderr
    assert not (tmp_path / "d").exists()


def test_make_run_needs_a_port_the_cli_can_find(tmp_path: Path) -> None:
    run = start_make_run(tmp_path, "BIND=127.0.0.1:0")
    try:
        code = run.make.proc.wait(timeout=120)
    finally:
        stop(run)
    assert code != 0
    assert "BIND: port 0 is not for make run" in run.log.read_text()
    assert not (run.run_root / "env").exists()


def test_a_second_make_run_leaves_the_first_ones_env(dev_run: DevRun, tmp_path: Path) -> None:
    """A second `make run` in the same checkout (another terminal, another BIND) failed on
    the state dir's lock, but only after it had rewritten .run/env to its own port: the
    first daemon still served, and `. .run/env; spk-visor node` got connection refused."""
    env_before = (dev_run.run_root / "env").read_text()
    log = tmp_path / "second.log"
    second = devrun.start(
        REPO, free_port(), dev_run.env, log, f"RUN_ROOT={dev_run.run_root}",
        f"SYSROOT={tmp_path / 'sysroot'}",
    )  # fmt: skip
    try:
        code = second.proc.wait(timeout=120)
    finally:
        if second.proc.poll() is None:
            second.stop()
    assert code != 0
    out = log.read_text()
    assert "make run" in out and "already" in out and "Ctrl-C" in out, out
    assert (dev_run.run_root / "env").read_text() == env_before
    result = dev_run.shell(". .run/env && spk-visor node")
    assert result.returncode == 0, result.stdout + result.stderr
