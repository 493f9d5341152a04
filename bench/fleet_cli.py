"""`spk-visor --fleet` at a thousand nodes, against one node, in the same run.

    .venv/bin/python -m bench.fleet_cli [--nodes 1000] [--black-holes 50] [--runs 5]

One simulator process (tests/support/fleet_sim.py) serves every node on its own loopback
port. Each round runs, in turns: `node --json` against one node (the anchor), against all
live nodes, and against all nodes with `--black-holes` of them accepting and never
answering. Reported: the median wall time of each, the ratios to one node, the peak RSS of
the CLI (ru_maxrss of the child), and what the black holes added against their deadline.

Goals (issue 14): 1,000 nodes <= 5x one node, <= 150 MiB peak; 50 hung nodes add no more
than their deadline (--timeout).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import figures
from tests.support.fleet_sim import TOKEN

ROOT = Path(__file__).resolve().parents[1]
GOAL_RATIO = 5.0
GOAL_PEAK_MIB = 150
DEADLINE = 3.0


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MiB, and the exit code of one CLI run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    elapsed = time.perf_counter() - t0
    # ru_maxrss of children is the largest of any child so far: only a new maximum shows.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, max(peak, before) / 1024, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--black-holes", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    figures.print_load("before")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        sim = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fleet_sim", "--nodes", str(args.nodes),
             "--black-holes", str(args.black_holes), "--config", str(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            assert sim.stdout is not None
            if sim.stdout.readline().strip() != "ready":
                raise SystemExit("the fleet simulator did not start")
            live = args.nodes - args.black_holes
            names = [f'"n{i:04d}"' for i in range(args.nodes)]
            with config.open("a") as f:
                f.write(f"live = [{', '.join(names[:live])}]\n")
            env = {
                **os.environ,
                "SPK_VISOR_CONFIG": str(config),
                "SPK_VISOR_TOKEN": TOKEN,
                "HOME": tmp,
            }
            cli = [sys.executable, "-m", "spk_visor", "--timeout", str(DEADLINE)]
            jobs = {
                "one node": ([*cli, "--fleet", "one", "--json", "node"], 0),
                f"{live} nodes": ([*cli, "--fleet", "live", "--json", "node"], 0),
                f"{args.nodes} nodes, {args.black_holes} hung": (
                    [*cli, "--fleet", "big", "--json", "node"],
                    7 if args.black_holes else 0,
                ),
            }
            samples: dict[str, list[float]] = {name: [] for name in jobs}
            peaks: dict[str, float] = dict.fromkeys(jobs, 0.0)
            for round_no in range(args.runs + 1):
                for name, (argv, expected) in jobs.items():
                    elapsed, peak, code = run(argv, env)
                    if code != expected:
                        raise SystemExit(f"{name}: exit {code}, expected {expected}")
                    peaks[name] = max(peaks[name], peak)
                    if round_no:  # the first round warms caches
                        samples[name].append(elapsed)
        finally:
            assert sim.stdin is not None
            sim.stdin.close()
            sim.wait(timeout=30)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    one = medians["one node"]
    print(f"{'job':<28} {'median':>9} {'x one node':>11}")
    for name, value in medians.items():
        # figures.ratio refuses a zero time, or a fleet "faster" than one node.
        speed = figures.ratio(samples["one node"], samples[name], name)
        print(f"{name:<28} {value:8.3f}s {1 / speed:10.2f}x")
    names = list(medians)
    added = medians[names[2]] - medians[names[1]]
    print(f"peak RSS (largest CLI run so far): {max(peaks.values()):.0f} MiB")
    print(f"{args.black_holes} hung nodes added {added:.2f} s against a {DEADLINE:g} s deadline")
    ratio = medians[names[1]] / one
    print(
        f"goal: {live} nodes <= {GOAL_RATIO:g}x one node: {ratio:.2f}x "
        f"({'met' if ratio <= GOAL_RATIO else 'missed'}); "
        f"hung nodes <= deadline: {'met' if added <= DEADLINE else 'missed'}; "
        f"peak <= {GOAL_PEAK_MIB} MiB: "
        f"{'met' if max(peaks.values()) <= GOAL_PEAK_MIB else 'missed'}"
    )
    figures.print_load("after")


if __name__ == "__main__":
    main()
