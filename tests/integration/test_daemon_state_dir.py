"""smechvisord with a state directory it cannot create: exit 2 naming the path and the
setting to change (--state-dir / SMECHVISORD_STATE_DIR), never a bare `[Errno 2]`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonEnv


@pytest.fixture
def env(tmp_path: Path) -> Iterator[DaemonEnv]:
    daemon_env = DaemonEnv(tmp_path / "d")
    yield daemon_env
    daemon_env.cleanup()


def start(env: DaemonEnv, *args: str) -> subprocess.CompletedProcess[str]:
    variables = env.env()
    variables["SMECHVISORD_BIND"] = "127.0.0.1:0"
    return subprocess.run(
        [sys.executable, "-m", "smechvisord", *args],
        env=variables,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("how", ["under-a-file", "in-proc"])
def test_a_state_dir_it_cannot_create_names_the_path_and_the_setting(
    env: DaemonEnv, tmp_path: Path, how: str
) -> None:
    if how == "under-a-file":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        state = blocker / "state"
    else:
        # /proc refuses new entries (ENOENT), even to root: the reviewer's [Errno 2].
        state = Path("/proc/smechvisord-no-such-dir/state")
    proc = start(env, "--state-dir", str(state))
    assert proc.returncode == 2, proc.stderr
    assert "Errno" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert str(state) in errors[0], errors[0]
    assert "--state-dir" in errors[0] and "SMECHVISORD_STATE_DIR" in errors[0], errors[0]
    assert not state.exists()


@pytest.mark.parametrize(
    ("flag", "env_name", "leaf"),
    [
        ("--run-dir", "SMECHVISORD_RUN_DIR", "run"),
        ("--token-file", "SMECHVISORD_TOKEN_FILE", "token"),
        ("--image-dirs", "SMECHVISORD_IMAGE_DIRS", "images"),
    ],
)
def test_other_paths_it_cannot_create_name_their_setting(
    env: DaemonEnv, flag: str, env_name: str, leaf: str
) -> None:
    # A short path: a VMM socket path under --run-dir must fit AF_UNIX's 107 bytes.
    fd, name = tempfile.mkstemp(prefix="smv-", dir="/tmp")
    os.close(fd)
    blocker = Path(name)
    try:
        path = blocker / leaf
        proc = start(env, flag, str(path))
    finally:
        blocker.unlink()
    assert proc.returncode == 2, proc.stderr
    assert "Errno" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert str(path) in errors[0] and flag in errors[0] and env_name in errors[0], errors[0]
