"""A settings file named by the admin that never ends (a device such as /dev/zero, a
pipe, a multi-gigabyte file given by mistake) is a usage error, read no further than its
size cap: the CLI must not read it whole into memory and die with "internal error"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spk_visor.errors import ExitCode
from tests.support.cli import NO_KNOWN_CERTS
from tests.support.prereq import need_command

ENDLESS = "/dev/zero"
# Far above every cap (at most a few MiB), far below what reading /dev/zero whole needs.
MEMORY_LIMIT = 1 << 30


def _spk_visor(
    tmp_path: Path, env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    # prlimit sets the limit in the child it execs: a preexec_fn would run Python between
    # fork and exec, unsafe when the test process has threads.
    prlimit = need_command("prlimit", "util-linux")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPK_VISOR_")}
    clean.update(
        {
            "HOME": str(tmp_path),
            "SPK_VISOR_CONFIG": str(tmp_path / "no-config.toml"),
            "SPK_VISOR_KNOWN_CERTS": NO_KNOWN_CERTS,
            **env,
        }
    )
    return subprocess.run(
        [prlimit, f"--as={MEMORY_LIMIT}", sys.executable, "-m", "spk_visor", *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _config_with_token_file(tmp_path: Path) -> Path:
    conf = tmp_path / "config.toml"
    conf.write_text(f'[nodes.a]\nurl = "http://127.0.0.1:9"\ntoken_file = "{ENDLESS}"\n')
    return conf


@pytest.mark.parametrize("which", ["config", "inventory", "token_file", "ota_conf"])
def test_an_endless_settings_file_is_a_usage_error(tmp_path: Path, which: str) -> None:
    if not Path(ENDLESS).is_char_device():
        pytest.skip(f"{ENDLESS} is not a character device here")
    if which == "config":
        res = _spk_visor(tmp_path, {"SPK_VISOR_CONFIG": ENDLESS}, "--node", "a", "node")
    elif which == "inventory":
        res = _spk_visor(tmp_path, {}, "--inventory", ENDLESS, "--fleet", "rack", "node")
    elif which == "token_file":
        conf = _config_with_token_file(tmp_path)
        res = _spk_visor(tmp_path, {"SPK_VISOR_CONFIG": str(conf)}, "--node", "a", "node")
    else:
        sysroot = tmp_path / "sysroot"
        (sysroot / "etc" / "spk-visor").mkdir(parents=True)
        (sysroot / "etc" / "spk-visor" / "ota.conf").symlink_to(ENDLESS)
        res = _spk_visor(tmp_path, {"SPK_VISOR_OTA_SYSROOT": str(sysroot)}, "ota", "pull", "-q")
    assert res.returncode == ExitCode.USAGE, res
    assert "internal error" not in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert ("ota.conf" if which == "ota_conf" else ENDLESS) in res.stderr, res.stderr


def test_an_endless_passphrase_file_is_a_usage_error(tmp_path: Path) -> None:
    """--passphrase-file names a secret of one line; a device there is the admin's slip,
    and no key is written."""
    if not Path(ENDLESS).is_char_device():
        pytest.skip(f"{ENDLESS} is not a character device here")
    key = tmp_path / "root1"
    res = _spk_visor(tmp_path, {}, "ota", "keygen", str(key), "--passphrase-file", ENDLESS)
    assert res.returncode == ExitCode.USAGE, res
    assert "internal error" not in res.stderr, res.stderr
    assert ENDLESS in res.stderr, res.stderr
    assert not key.exists()


def test_a_settings_file_that_is_a_pipe_is_a_usage_error(tmp_path: Path) -> None:
    """A named pipe with no writer would block the open forever: refused at once instead."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    try:
        res = _spk_visor(
            tmp_path, {"SPK_VISOR_CONFIG": str(fifo)}, "--node", "a", "node", timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("spk-visor blocked opening a named pipe as its config file")
    assert res.returncode == ExitCode.USAGE, res
    assert "internal error" not in res.stderr, res.stderr
    assert str(fifo) in res.stderr and "pipe" in res.stderr, res.stderr
