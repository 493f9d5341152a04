from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonEnv, kill_vmms


@pytest.fixture
def daemon_env(tmp_path: Path) -> Iterator[DaemonEnv]:
    env = DaemonEnv(tmp_path)
    yield env
    kill_vmms(env.run_dir)
    env.cleanup()
