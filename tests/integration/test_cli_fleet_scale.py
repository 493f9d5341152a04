"""`--fleet` against hundreds of simulated nodes in one process (tests/support/fleet_sim.py):
one answer per node, hung nodes reported each with its own deadline, a summary of the
failures by cause. Speed at a thousand nodes is measured in bench/fleet_cli.py, not here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spk_visor import config
from spk_visor.client import Client, JsonDoc
from spk_visor.connection import NodeResult, for_each
from tests.support.fleet_sim import TOKEN

ROOT = Path(__file__).resolve().parents[2]
NODES = 200
HOLES = 10


@pytest.fixture
def fleet_config(tmp_path: Path) -> Iterator[Path]:
    with simulator(NODES, HOLES, tmp_path / "config.toml") as config:
        yield config


@contextlib.contextmanager
def simulator(nodes: int, holes: int, config: Path) -> Iterator[Path]:
    """`nodes` simulated daemons, the last `holes` of them black holes (they accept and
    never answer); a config.toml naming them all (group `big`) at `config`."""
    sim = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fleet_sim", "--nodes", str(nodes),
         "--black-holes", str(holes), "--config", str(config)],
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


DEADLINE = 3.0
# Far more than it takes to notice a deadline (milliseconds), less than a second deadline:
# a row that waited out its deadline twice, or for anything after it, fails.
MARGIN = 2.0


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_black_hole_costs_its_deadline_and_holds_up_no_other_node(
    where: str, tmp_path: Path
) -> None:
    """One node that accepts and never answers, among twenty that answer, one node at a
    time (--parallel 1): the hung node's row says so after its own deadline and not a
    deadline plus anything; every live node answers while it hangs; the fleet's result is
    complete as soon as the hung node's row is. The times checked are those the runner
    recorded for each row (NodeResult.seconds) and the instants the rows landed, not the
    wall time of a whole run on a loaded machine."""
    live = 20
    with simulator(live + 1, 1, tmp_path / "config.toml") as path:
        settings = config.resolve(
            node=None, ssh=None, fleet="big", token=TOKEN, timeout=DEADLINE,
            accept_new=False, parallel=1,
            environ={"SPK_VISOR_CONFIG": str(path), "HOME": str(tmp_path)},
        )  # fmt: skip
        *answering, hung = settings.targets
        at = {"first": 0, "middle": live // 2, "last": live}[where]
        order = (*answering[:at], hung, *answering[at:])
        landed: dict[str, float] = {}
        lock = threading.Lock()

        def on_done(result: NodeResult[JsonDoc]) -> None:
            with lock:
                landed[result.target.name] = time.monotonic()

        results = for_each(dataclasses.replace(settings, targets=order), Client.node, on_done)
        returned = time.monotonic()
    assert [r.target.name for r in results] == [t.name for t in order]
    by_name = {r.target.name: r for r in results}
    stuck = by_name[hung.name]
    assert stuck.error is not None
    assert f"within {DEADLINE:g} s" in stuck.error.message
    assert DEADLINE <= stuck.seconds < DEADLINE + MARGIN, stuck.seconds
    others = [by_name[t.name] for t in answering]
    assert all(r.ok for r in others), [r.error for r in others if r.error]
    # Each its own answer, each while the hung node still waited (--parallel 1: without
    # the hung node set aside, those behind it would have waited out its deadline).
    assert len({r.value["hostname"] for r in others if r.value}) == live
    assert all(r.seconds < DEADLINE for r in others), [r.seconds for r in others]
    assert all(landed[r.target.name] < landed[hung.name] for r in others)
    assert returned - landed[hung.name] < MARGIN


def test_parallel_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "SPK_VISOR_CONFIG": str(tmp_path / "none")}
    proc = subprocess.run(
        [sys.executable, "-m", "spk_visor", "--parallel", "0", "node"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--parallel 0: must be between 1 and" in proc.stderr
