"""The spk-visor-ota boot service under the real OpenRC: it runs `ota boot-check` (which
recovers interrupted OTA work first, under the same lock: one Python start per boot), and
reboots when the trial boot failed (boot-check exit 5)."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_openrc import CONF_D, INIT_D, OPENRC_DIR, openrc, rc  # noqa: F401
from tests.support.hostpaths import host_paths
from tests.support.ota_pki import Pki, make_node

REPO = Path(__file__).resolve().parents[2]


def test_script_is_an_openrc_script() -> None:
    path = OPENRC_DIR / "spk-visor-ota"
    assert path.read_text().startswith("#!/sbin/openrc-run\n")
    assert path.stat().st_mode & stat.S_IXUSR
    for f in (path, OPENRC_DIR / "spk-visor-ota.confd"):
        subprocess.run(["sh", "-n", str(f)], check=True)
    assert "before smechvisord" in path.read_text()


@pytest.fixture
def service(openrc: None, tmp_path: Path) -> Iterator[tuple[str, Path]]:  # noqa: F811
    name = f"spkota-boot-{uuid.uuid4().hex[:8]}"
    with host_paths() as made:
        init = made.adopt(made.dir(INIT_D) / name)
        shutil.copyfile(OPENRC_DIR / "spk-visor-ota", init)
        init.chmod(0o755)
        # Debian's openrc ships no /etc/conf.d: the test makes it (and removes it) itself.
        made.dir(CONF_D)
        try:
            yield name, made.adopt(CONF_D / name)
        finally:
            rc(name, "zap")


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_boot_service_recovers_with_the_real_cli(service: tuple[str, Path], tmp_path: Path) -> None:
    name, conf = service
    node = make_node(tmp_path, Pki())
    stale = node.paths.releases / ".staging-2.0.0-deadbeef"
    (stale / "bin").mkdir(parents=True)
    # A swap cut between making the new link and renaming it over `current`.
    half_swapped = node.paths.current.with_name("current.tmp")
    half_swapped.symlink_to("releases/2.0.0-deadbeef")
    cli = _script(
        tmp_path / "spk-visor", f'cd "{REPO}" && exec "{sys.executable}" -m spk_visor "$@"\n'
    )
    reboot = _script(tmp_path / "reboot", f'touch "{tmp_path}/rebooted"\n')
    conf.write_text(
        f"SPK_VISOR_BIN='{cli}'\nSPK_VISOR_OTA_SYSROOT='{node.sysroot}'\n"
        f"SPK_VISOR_OTA_REBOOT_CMD='{reboot}'\n"
    )
    started = rc(name, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert not stale.exists(), "ota recover did not run: the half-staged release is still there"
    assert not half_swapped.is_symlink(), "the half-done swap's link is still there"
    assert not (tmp_path / "rebooted").exists()


def test_failed_trial_reboots(service: tuple[str, Path], tmp_path: Path) -> None:
    name, conf = service
    calls = tmp_path / "calls"
    fake = _script(
        tmp_path / "spk-visor",
        f'echo "$*" >> "{calls}"\n[ "$2" = boot-check ] && exit 5\nexit 0\n',
    )
    reboot = _script(tmp_path / "reboot", f'touch "{tmp_path}/rebooted"\n')
    conf.write_text(f"SPK_VISOR_BIN='{fake}'\nSPK_VISOR_OTA_REBOOT_CMD='{reboot}'\n")
    started = rc(name, "start")
    assert started.returncode != 0
    assert calls.read_text().splitlines() == ["ota boot-check"]
    assert (tmp_path / "rebooted").exists()


def test_one_cli_start_per_boot(service: tuple[str, Path], tmp_path: Path) -> None:
    """`ota boot-check` recovers before it checks (engine.manual), so the service starts
    the CLI, a Python start of a second or more on a node, once."""
    name, conf = service
    calls = tmp_path / "calls"
    fake = _script(tmp_path / "spk-visor", f'echo "$*" >> "{calls}"\nexit 0\n')
    conf.write_text(f"SPK_VISOR_BIN='{fake}'\n")
    started = rc(name, "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert calls.read_text().splitlines() == ["ota boot-check"]
