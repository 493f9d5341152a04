"""Throughput and latency of smechvisord's GET /api/health, /api/node and /api/vms (with
50 running stand-in VMs) at 1, 10 and 50 concurrent keep-alive clients, against a bare
ThreadingHTTPServer measured in the same run with the same client.

    make bench            # or: .venv/bin/python -m bench.daemon [--seconds 2] [--vms 50]

The client is this process's threads, so it shares the machine's cores with the server
under test; the ratio to the anchor is the figure to read, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.daemon import Daemon, DaemonEnv, kill_vmms

CONCURRENCY = (1, 10, 50)
GOAL_NODE_RATIO = 0.5
GOAL_P99_MS = 20.0


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def load(port: int, path: str, clients: int, seconds: float, token: str | None) -> Result:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = latencies[i]
        start.wait()
        while time.monotonic() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors[i] += 1
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    began = time.monotonic()
    stop_at[0] = began + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    all_lat = sorted(x for per in latencies for x in per)
    if not all_lat:
        return Result(0.0, float("nan"), float("nan"), sum(errors))
    p99 = all_lat[min(len(all_lat) - 1, int(len(all_lat) * 0.99))]
    return Result(
        len(all_lat) / elapsed, statistics.median(all_lat) * 1000, p99 * 1000, sum(errors)
    )


WRK_LINE = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def load_wrk(port: int, path: str, clients: int, seconds: float, token: str | None) -> Result:
    """The same measurement with wrk (C, epoll): far less client overhead than Python
    threads, so latencies are the server's own."""
    argv = [
        "wrk",
        "--latency",
        f"-c{clients}",
        f"-t{min(clients, 2)}",
        f"-d{max(1, round(seconds))}s",
    ]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = {m.group(1): float(m.group(2)) * UNIT_MS[m.group(3)] for m in WRK_LINE.finditer(out)}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return Result(rps, pct["50"], pct["99"], int(bad.group(1)) if bad else 0 + (1 if errors else 0))


def start_bare() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_server"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--vms", type=int, default=50, help="stand-in VMs for /api/vms")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (median kept)")
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (auto: wrk when installed)",
    )
    args = parser.parse_args()
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    measure = load_wrk if use_wrk else load

    root = Path(tempfile.mkdtemp(prefix="svbench"))
    env = DaemonEnv(root)
    if Path("/dev/kvm").exists():
        # Measure what a node runs: the real / (its /proc and /sys), not a fixture tree.
        env.extra_env.update(SMECHVISORD_SYSROOT="/", CH_STANDIN_SYSROOT="/")
    else:
        print(
            "no /dev/kvm here: measuring against the intel-ready fixture sysroot", file=sys.stderr
        )
    daemon = Daemon(env)
    bare, bare_port = start_bare()
    try:
        print(f"starting {args.vms} stand-in VMs ...", file=sys.stderr)
        for i in range(args.vms):
            disk = env.make_image(f"d{i}.img", 4096)
            r = daemon.post(
                "/api/vms", {"cpus": 1, "memory_mb": 128, "disk": str(disk), "name": f"bench-{i}"}
            )
            if r.status != 201:
                raise SystemExit(f"VM {i} did not start: {r.status} {r.raw[:300]!r}")
        running = sum(1 for v in daemon.get("/api/vms").json if v["managed"])
        client = "wrk" if use_wrk else "python threads"
        print(f"{running} VMs running; {args.seconds:g} s per measurement; client: {client}\n")
        rows: dict[tuple[str, int], Result] = {}
        print(
            f"{'target':<16}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'vs bare':>9}{'errors':>8}"
        )
        # First requests pay one-time costs (the VMM's --version, cold caches): warm up.
        load(bare_port, "/", 1, 0.3, None)
        for path in ("/api/health", "/api/node", "/api/vms"):
            load(daemon.port, path, 1, 0.3, daemon.token)
        targets = [("bare", bare_port, "/", None)] + [
            (path, daemon.port, path, daemon.token)
            for path in ("/api/health", "/api/node", "/api/vms")
        ]
        for clients in CONCURRENCY:
            # Interleaved repeats, median by throughput: this machine is a VM whose speed
            # drifts from second to second.
            samples: dict[str, list[Result]] = {t[0]: [] for t in targets}
            for _ in range(args.repeats):
                for name, port, path, token in targets:
                    samples[name].append(measure(port, path, clients, args.seconds, token))
            for name, runs in samples.items():
                rows[(name, clients)] = sorted(runs, key=lambda r: r.rps)[len(runs) // 2]
            base = rows[("bare", clients)].rps
            for target in ("bare", "/api/health", "/api/node", "/api/vms"):
                res = rows[(target, clients)]
                print(
                    f"{target:<16}{clients:>8}{res.rps:>10.0f}{res.p50_ms:>9.2f}"
                    f"{res.p99_ms:>9.2f}{res.rps / base:>8.2f}x{res.errors:>8}"
                )
        print()
        node_ratio = min(rows[("/api/node", c)].rps / rows[("bare", c)].rps for c in CONCURRENCY)
        p99_10 = max(rows[(t, 10)].p99_ms for t in ("/api/health", "/api/node", "/api/vms"))
        vms_p99 = rows[("/api/vms", 10)].p99_ms
        goals = [
            (
                f"/api/node >= {GOAL_NODE_RATIO}x bare at every concurrency",
                node_ratio >= GOAL_NODE_RATIO,
                f"worst {node_ratio:.2f}x",
            ),
            (
                f"p99 < {GOAL_P99_MS:g} ms at 10 clients",
                p99_10 < GOAL_P99_MS,
                f"worst {p99_10:.2f} ms",
            ),
            (
                f"/api/vms with {running} VMs < {GOAL_P99_MS:g} ms (p99, 10 clients)",
                vms_p99 < GOAL_P99_MS,
                f"{vms_p99:.2f} ms",
            ),
        ]
        for text, ok, figure in goals:
            print(f"[{'met' if ok else 'MISSED'}] {text}: {figure}")
        return 0
    finally:
        bare.terminate()
        bare.wait(timeout=5)
        daemon.stop()
        kill_vmms(env.run_dir)
        env.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
