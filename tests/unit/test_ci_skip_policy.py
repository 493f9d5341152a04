"""Under CI=true a skipped test fails the run (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SKIPPING_TEST = """
import pytest

def test_needs_something():
    pytest.skip("needs a frobnicator")
"""


def run(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    test_dir = tmp_path / "tests"
    test_dir.mkdir(exist_ok=True)
    (test_dir / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (test_dir / "test_skip.py").write_text(SKIPPING_TEST)
    env = {**os.environ, "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.parametrize(("ci", "code"), [("true", 1), ("", 0)])
def test_skip_counts_as_failure_only_in_ci(tmp_path: Path, ci: str, code: int) -> None:
    out = run(tmp_path, ci)
    assert out.returncode == code, out.stdout
    if code:
        assert "needs a frobnicator" in out.stdout
