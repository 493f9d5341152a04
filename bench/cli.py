"""Wall time of the spk-visor CLI: start-up, one `node` query against curl of the same URL,
and a fleet of 20 daemons against one node queried 20 times one by one.

    make bench            # or: .venv/bin/python -m bench.cli [--runs 15] [--fleet 20]

Each figure is the median of --runs runs of a fresh process, after two warm-up runs. The
commands of a table run in turns (one of each per round), as bench/daemon.py does: this
machine is a VM whose speed drifts, and turns spread the drift over all of them. The
anchors are curl and one `node` query, measured in the same rounds.

Also shown: `python -X importtime` of the CLI, and whether paramiko or cryptography load on
the HTTP path (they must not: they are the SSH transport's, and cost ~0.2 s), nor the
modules of commands that do not run (spk_visor/commands/lazy.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.support.daemon import Daemon, DaemonEnv

GOAL_NODE_SECONDS = 0.15
GOAL_FLEET_RATIO = 3.0
HEAVY = ("paramiko", "cryptography")
FLOOR = "python -c 'import typer, http.client, ssl' (library floor)"
# requests' figure includes urllib3's, which it imports. Neither should be on the path.
NOT_ON_PATH = ("requests", "urllib3")
SHOWN_PACKAGES = ("typer", "requests", "urllib3", "pydantic", "rich")
# What only other commands need: loading one on the `node` path is start-up time wasted.
OTHER_COMMANDS = (
    "spk_visor.commands.ota",
    "spk_visor.commands.deploy",
    "spk_visor.commands.vm",
    "spk_visor.ota",
    "spk_visor.deploy",
    "tqdm",
    "zstandard",
)
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")
WARMUP = 2


@dataclass(frozen=True)
class Job:
    argv: tuple[str, ...]
    repeat: int = 1  # sequential runs timed as one sample


@dataclass
class Timing:
    median: float
    best: float
    # CPU time (user + system) of the process: on a machine shared with other work the
    # wall time waits for a core, the CPU time much less so.
    cpu: float = 0.0

    def __str__(self) -> str:
        return (
            f"{self.median * 1000:8.1f} ms (best {self.best * 1000:6.1f}, "
            f"cpu {self.cpu * 1000:6.1f})"
        )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(job: Job, env: dict[str, str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one run of `job`."""
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    for _ in range(job.repeat):
        proc = subprocess.run(
            job.argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(job.argv)}: exit {proc.returncode}\n{proc.stderr!r}")
    return time.perf_counter() - t0, _children_cpu() - cpu0


def measure(jobs: dict[str, Job], env: dict[str, str], runs: int) -> dict[str, Timing]:
    """Median wall (and CPU) time per job, the jobs taking turns round by round."""
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    for round_no in range(WARMUP + runs):
        for name, job in jobs.items():
            elapsed, used = run_once(job, env)
            if round_no >= WARMUP:  # warm-up: page cache, bytecode cache, daemon caches
                samples[name].append(elapsed)
                cpu[name].append(used)
    return {
        name: Timing(statistics.median(s), min(s), statistics.median(cpu[name]))
        for name, s in samples.items()
    }


def cli_argv() -> list[str]:
    """The console script users run, as pip installed it next to this interpreter."""
    script = Path(sys.executable).with_name("spk-visor")
    return [str(script)] if script.exists() else [sys.executable, "-m", "spk_visor"]


def bench_env(root: Path, config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_VISOR_")}
    env["SPK_VISOR_CONFIG"] = str(config)
    # An installed CLI runs from compiled bytecode. With PYTHONDONTWRITEBYTECODE (set in
    # some dev shells) every run would compile spk_visor from source again, ~80 ms here;
    # the cache goes to a temp dir so the checkout is left alone.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    return env


def start_daemons(root: Path, count: int) -> list[Daemon]:
    def start(i: int) -> Daemon:
        return Daemon(DaemonEnv(root / f"d{i:02d}"))

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(start, range(count)))


def write_config(path: Path, daemons: list[Daemon], group: str) -> list[str]:
    names = [f"n{i:02d}" for i in range(len(daemons))]
    lines = []
    for name, d in zip(names, daemons, strict=True):
        # Each daemon has its own token: the fleet reads each node's token file.
        lines += [f"[nodes.{name}]", f'url = "{d.url}"', f'token_file = "{d.env.token_file}"', ""]
    lines += ["[groups]", f"{group} = [{', '.join(json.dumps(n) for n in names)}]", ""]
    path.write_text("\n".join(lines))
    return names


def check_fleet(cli: list[str], env: dict[str, str], names: list[str]) -> None:
    """The fleet query answers for every node before it is timed."""
    out = subprocess.run(
        [*cli, "--fleet", "g20", "--json", "node"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    doc = json.loads(out.stdout or "{}")
    failed = [n for n in names if "error" in doc.get(n, {"error": "missing"})]
    if out.returncode != 0 or failed:
        raise SystemExit(f"fleet query failed (exit {out.returncode}): {failed}\n{out.stderr}")


def import_times(argv: Sequence[str], env: dict[str, str], runs: int = 5) -> dict[str, float]:
    """Median cumulative import time (seconds) per module under `python -X importtime`;
    the key keeps the nesting as indentation."""
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        for line in proc.stderr.splitlines():
            m = IMPORT_LINE.match(line)
            if m:
                name = ("  " * (len(m.group(3)) // 2)) + m.group(4)
                samples.setdefault(name, []).append(int(m.group(2)) / 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def package_time(times: dict[str, float], package: str) -> float:
    """Cumulative time of a package: -X importtime reports each module once, nested under
    whatever imported it first, so its own line holds all it cost."""
    return sum(t for name, t in times.items() if name.strip() == package)


def print_table(
    rows: dict[str, Timing], anchor: str, unit: str, labels: dict[str, str] | None = None
) -> None:
    base = rows[anchor].median
    for name, t in rows.items():
        label = (labels or {}).get(name, name)
        print(f"{label:<52}{t}{t.median / base:9.2f}x {unit}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per figure (median kept)")
    parser.add_argument("--fleet", type=int, default=20, help="daemons in the fleet")
    args = parser.parse_args()
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl not found: install the Debian package curl")

    root = Path(tempfile.mkdtemp(prefix="svclibench"))
    print(f"starting {args.fleet} daemons ...", file=sys.stderr)
    daemons = start_daemons(root, args.fleet)
    try:
        one = daemons[0]
        config = root / "config.toml"
        names = write_config(config, daemons, "g20")
        env = bench_env(root, config)
        cli = cli_argv()
        node_args = ("--node", one.url, "--token", one.token, "--json", "node")
        auth = f"Authorization: Bearer {one.token}"
        check_fleet(cli, env, names)
        runs = args.runs
        print(f"median of {runs} runs in turns; CLI: {' '.join(cli)}\n")

        startup = measure(
            {
                "python -c pass (interpreter floor)": Job((sys.executable, "-c", "pass")),
                # What the CLI cannot go below while it keeps its libraries: typer, and
                # the standard library's HTTP and TLS (requests is no longer on the path).
                FLOOR: Job((sys.executable, "-c", "import typer, http.client, ssl")),
                "python -c 'import spk_visor.cli'": Job(
                    (sys.executable, "-c", "import spk_visor.cli")
                ),
                "spk-visor --version": Job((*cli, "--version")),
                "spk-visor --node URL --token T --json node": Job((*cli, *node_args)),
                "curl -s -H 'Authorization: Bearer T' URL/api/node": Job(
                    (curl, "-sf", "-o", "/dev/null", "-H", auth, f"{one.url}/api/node")
                ),
            },
            env,
            runs,
        )
        print_table(startup, "curl -s -H 'Authorization: Bearer T' URL/api/node", "curl")
        node = startup["spk-visor --node URL --token T --json node"]
        floor = startup[FLOOR]
        print(
            f"{'':<52}the node query costs {(node.median - floor.median) * 1000:+.1f} ms wall, "
            f"{(node.cpu - floor.cpu) * 1000:+.1f} ms cpu over importing its libraries"
        )

        print(f"\nfleet of {args.fleet} daemons over HTTP (config file, token_file per node)")
        one_node = Job((*cli, "--node", names[0], "--json", "node"))
        fleet_rows = measure(
            {"one": one_node, "fleet": Job((*cli, "--fleet", "g20", "--json", "node"))},
            env,
            runs,
        )
        seq_runs = max(3, runs // 3)
        fleet_rows["sequential"] = measure(
            {"sequential": Job(one_node.argv, repeat=args.fleet)}, env, seq_runs
        )["sequential"]
        print_table(
            fleet_rows,
            "one",
            "one node",
            {
                "one": "one node: spk-visor --node n00 --json node",
                "fleet": f"fleet: spk-visor --fleet g20 --json node ({args.fleet})",
                "sequential": f"{args.fleet} x one node, one by one ({seq_runs} runs)",
            },
        )
        single, fleet = fleet_rows["one"], fleet_rows["fleet"]
        speedup = fleet_rows["sequential"].median / fleet.median
        print(f"{'':<52}the fleet query is {speedup:.1f}x faster than one by one")

        # The real HTTP path under -X importtime: what it loads, and what that costs.
        path_imports = import_times(["-m", "spk_visor", *node_args], env)
        print("\npython -X importtime -m spk_visor --node URL --token T --json node")
        print("(median of 5), top 10:")
        print(f"{'cumulative':>12}  module (indented: imported by the line above it)")
        for name, cost in sorted(path_imports.items(), key=lambda kv: -kv[1])[:10]:
            print(f"{cost * 1000:9.1f} ms  {name}")
        print("\nby package, on that path:")
        for pkg in (*SHOWN_PACKAGES, *HEAVY, *OTHER_COMMANDS):
            cost = package_time(path_imports, pkg)
            print(f"  {pkg:<28}{f'{cost * 1000:7.1f} ms' if cost else 'not imported'}")
        loaded = {n.strip() for n in path_imports}
        loaded_heavy = sorted({n.split(".")[0] for n in loaded} & set(HEAVY))
        verdict = "imported: " + ", ".join(loaded_heavy) if loaded_heavy else "neither imported"
        loaded_other = sorted(m for m in OTHER_COMMANDS if m in loaded)
        loaded_requests = sorted({n.split(".")[0] for n in loaded} & set(NOT_ON_PATH))
        other_verdict = "imported: " + ", ".join(loaded_other) if loaded_other else "none imported"

        print()
        goals = [
            (
                "paramiko / cryptography not imported on the HTTP path",
                not loaded_heavy,
                verdict,
            ),
            (
                "requests / urllib3 not imported on the HTTP path",
                not loaded_requests,
                "imported: " + ", ".join(loaded_requests) if loaded_requests else "neither",
            ),
            (
                "no other command's module or library on the `node` path",
                not loaded_other,
                other_verdict,
            ),
            (
                f"spk-visor --json node <= {GOAL_NODE_SECONDS} s",
                node.median <= GOAL_NODE_SECONDS,
                f"{node.median:.3f} s",
            ),
            (
                f"fleet of {args.fleet} <= {GOAL_FLEET_RATIO:g}x one node",
                fleet.median <= GOAL_FLEET_RATIO * single.median,
                f"{fleet.median / single.median:.2f}x",
            ),
        ]
        for text, ok, figure in goals:
            print(f"[{'met' if ok else 'MISSED'}] {text}: {figure}")
        return 0
    finally:
        for d in daemons:
            d.stop()
            d.env.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
