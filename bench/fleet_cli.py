"""`spk-visor --fleet` at a thousand nodes, against one node, in the same run.

    .venv/bin/python -m bench.fleet_cli [--nodes 1000] [--black-holes 50] [--runs 5]
        [--baseline DIR]

One simulator process (tests/support/fleet_sim.py) serves every node on its own loopback
port. Each round runs, in turns (each round starting with a different job, so that a
drift in the machine's speed hits every job alike): `node --json` against one node (the
anchor), against all live nodes, and against all nodes with `--black-holes` of them
accepting and never answering, twice: with the hung nodes last in the group (the worst
case: they start only when the live ones are done) and spread evenly through it.
Reported: the median wall time of each, the ratios to one node, the peak RSS of the CLI
(ru_maxrss of the child), what the hung nodes added against their deadline in each
layout (the median of the per-round differences with the live nodes alone), and the load
average at the start of each round.

Goals (issue 14): 1,000 nodes <= 5x one node, <= 150 MiB peak; 50 hung nodes add no more
than their deadline (--timeout). A figure that cannot be true stops the bench instead of
being reported (bench/figures.py): hung nodes that added less than their deadline less
the whole live run (they cannot have been reported before their deadline), or more than
twice it (something waited out a deadline twice).

`--baseline DIR` runs the same jobs, in the same rounds, with the spk_visor of another
checkout (for example `git worktree add /tmp/before HEAD~3`), to compare two versions
under the same load.
"""

from __future__ import annotations

import argparse
import os
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


def run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MiB, and the exit code of one CLI run (`python -m
    spk_visor` in `cwd` runs that checkout's spk_visor)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd
    )
    # wait4: this child's own peak, not the largest of every child so far.
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_maxrss / 1024, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--black-holes", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    args = parser.parse_args()
    if args.baseline and not (args.baseline / "spk_visor" / "__main__.py").is_file():
        raise SystemExit(f"--baseline {args.baseline}: not a checkout of spk-visor")
    versions = {"": ROOT, **({" (baseline)": args.baseline.resolve()} if args.baseline else {})}
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
                f.write(f"spread = [{', '.join(spread(names, args.black_holes))}]\n")
            env = {
                **os.environ,
                "SPK_VISOR_CONFIG": str(config),
                "SPK_VISOR_TOKEN": TOKEN,
                "HOME": tmp,
            }
            cli = [sys.executable, "-m", "spk_visor", "--timeout", str(DEADLINE)]
            hung_exit = 7 if args.black_holes else 0
            kinds = {
                "one node": ([*cli, "--fleet", "one", "--json", "node"], 0),
                f"{live} nodes": ([*cli, "--fleet", "live", "--json", "node"], 0),
                f"{args.nodes} nodes, {args.black_holes} hung last": (
                    [*cli, "--fleet", "big", "--json", "node"],
                    hung_exit,
                ),
                f"{args.nodes} nodes, {args.black_holes} hung spread": (
                    [*cli, "--fleet", "spread", "--json", "node"],
                    hung_exit,
                ),
            }
            jobs = {
                kind + suffix: (argv, expected, where)
                for suffix, where in versions.items()
                for kind, (argv, expected) in kinds.items()
            }
            samples: dict[str, list[float]] = {name: [] for name in jobs}
            peaks: dict[str, float] = dict.fromkeys(jobs, 0.0)
            order = list(jobs)
            loads: list[float] = []
            for round_no in range(args.runs + 1):
                loads.append(os.getloadavg()[0])
                # Each round starts with a different job: a drift hits all alike.
                turn = order[round_no % len(order) :] + order[: round_no % len(order)]
                for name in turn:
                    argv, expected, where = jobs[name]
                    elapsed, peak, code = run(argv, env, where)
                    if code != expected:
                        raise SystemExit(f"{name}: exit {code}, expected {expected}")
                    peaks[name] = max(peaks[name], peak)
                    if round_no:  # the first round warms caches
                        samples[name].append(elapsed)
        finally:
            assert sim.stdin is not None
            sim.stdin.close()
            sim.wait(timeout=30)
    names = list(kinds)
    print(
        f"load average (1 min) at the start of each round: "
        f"{' '.join(f'{x:.2f}' for x in loads)}; median {statistics.median(loads):.2f}"
    )
    for suffix in versions:
        report(args, {kind: samples[kind + suffix] for kind in names}, suffix, live)
        peak = max(peaks[kind + suffix] for kind in names)
        print(
            f"peak RSS{suffix} of the CLI: {peak:.0f} MiB; goal <= "
            f"{GOAL_PEAK_MIB} MiB: {'met' if peak <= GOAL_PEAK_MIB else 'missed'}"
        )
    figures.print_load("after")


def spread(names: list[str], holes: int) -> list[str]:
    """The group with its hung nodes (the simulator's last `holes`) spread evenly through
    it: one in the middle of each stretch of len(names) / holes nodes."""
    if not holes:
        return names
    answering, hung = names[: len(names) - holes], iter(names[len(names) - holes :])
    step = len(names) / holes
    at = {int(k * step + step / 2) for k in range(holes)}
    live = iter(answering)
    return [next(hung) if i in at else next(live) for i in range(len(names))]


def report(
    args: argparse.Namespace, samples: dict[str, list[float]], suffix: str, live: int
) -> None:
    """One version's table and goals. What the hung nodes added is the median of the
    differences within each round (the rounds ran under the same load), not the
    difference of the medians."""
    medians = {name: statistics.median(s) for name, s in samples.items()}
    names = list(medians)
    one = medians[names[0]]
    print(f"\n{'job' + suffix:<40} {'median':>9} {'x one node':>11}")
    for name, value in medians.items():
        # figures.ratio refuses a zero time, or a fleet "faster" than one node.
        speed = figures.ratio(samples[names[0]], samples[name], name)
        print(f"{name:<40} {value:8.3f}s {1 / speed:10.2f}x")
    met = True
    for layout, name in (("last", names[2]), ("spread", names[3])):
        diffs = [h - lv for h, lv in zip(samples[name], samples[names[1]], strict=True)]
        added = statistics.median(diffs)
        # Each hung node is reported no sooner than its deadline after its request
        # started, and the last of them starts before the live nodes are all done.
        figures.check_between(
            added, DEADLINE - medians[names[1]], 2 * DEADLINE, f"hung nodes {layout}{suffix}"
        )
        met = met and added <= DEADLINE
        print(
            f"{args.black_holes} hung nodes {layout:<6} added {added:.2f} s against a "
            f"{DEADLINE:g} s deadline (median of the differences in each round; "
            f"{min(diffs):.2f} to {max(diffs):.2f})"
        )
    ratio = medians[names[1]] / one
    print(
        f"goal{suffix}: {live} nodes <= {GOAL_RATIO:g}x one node: {ratio:.2f}x "
        f"({'met' if ratio <= GOAL_RATIO else 'missed'}); "
        f"hung nodes <= deadline: {'met' if met else 'missed'}"
    )


if __name__ == "__main__":
    main()
