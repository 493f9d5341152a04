"""`--fleet` against hundreds of simulated nodes in one process (tests/support/fleet_sim.py):
one answer per node, hung nodes reported each with its own deadline, a summary of the
failures by cause. Speed at a thousand nodes is measured in bench/fleet_cli.py, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fleet_sim import TOKEN

ROOT = Path(__file__).resolve().parents[2]
NODES = 200
HOLES = 10


@pytest.fixture
def fleet_config(tmp_path: Path) -> Iterator[Path]:
    config = tmp_path / "config.toml"
    sim = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fleet_sim", "--nodes", str(NODES),
         "--black-holes", str(HOLES), "--config", str(config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert sim.stdout is not None
        assert sim.stdout.readline().strip() == "ready"
        yield config
    finally:
        assert sim.stdin is not None
        sim.stdin.close()  # the simulator's cue to stop
        try:
            sim.wait(timeout=20)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait(timeout=5)


def test_hundreds_of_nodes_with_hung_ones(fleet_config: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SPK_VISOR_CONFIG": str(fleet_config),
        "SPK_VISOR_TOKEN": TOKEN,
        "HOME": str(tmp_path),
    }
    env.pop("SPK_VISOR_NODE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "spk_visor", "--timeout", "2", "--parallel", "8",
         "--fleet", "big", "--json", "node"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 7, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc) == NODES
    answered = {name: d for name, d in doc.items() if "error" not in d}
    assert len(answered) == NODES - HOLES
    # Each node's own answer, not one copied to all.
    assert len({d["hostname"] for d in answered.values()}) == NODES - HOLES
    hung = sorted(name for name, d in doc.items() if "error" in d)
    assert hung == [f"n{i:04d}" for i in range(NODES - HOLES, NODES)]
    assert all("within 2 s" in doc[name]["error"]["message"] for name in hung)
    assert f"{HOLES} of {NODES} nodes failed: {HOLES} no answer within 2 s" in proc.stderr


def test_parallel_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "SPK_VISOR_CONFIG": str(tmp_path / "none")}
    proc = subprocess.run(
        [sys.executable, "-m", "spk_visor", "--parallel", "0", "node"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--parallel 0: must be between 1 and" in proc.stderr
