"""The suite runs in random order (pytest-randomly) and every run says how to replay it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGET = "tests/unit/test_hostpaths.py"


def _run(*args: str) -> tuple[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *args, TARGET],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    order = re.findall(r"^(tests/\S+::\S+) PASSED", out, re.MULTILINE)
    return out, order


def test_the_seed_is_printed_and_replays_the_order() -> None:
    out, order = _run()
    replay = re.search(r"^random order: replay it with `pytest -p randomly --randomly-seed=(\d+)`$",
                       out, re.MULTILINE)  # fmt: skip
    assert replay, f"no replay line in:\n{out}"
    assert len(order) >= 4
    for _ in range(2):
        _, again = _run("-p", "randomly", f"--randomly-seed={replay.group(1)}")
        assert again == order


def test_seeds_change_the_order() -> None:
    orders = {tuple(_run(f"--randomly-seed={seed}")[1]) for seed in range(1, 9)}
    assert len(orders) > 1, "eight seeds gave one order: the suite does not run shuffled"
