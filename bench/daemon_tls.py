"""What TLS costs smechvisord, measured against anchors in the same run.

    .venv/bin/python -m bench.daemon_tls [--seconds 1] [--repeats 3] [--runs 9]

1. Keep-alive throughput over TLS: wrk (or Python threads without wrk) on GET /api/node
   at 1, 10 and 50 connections, against an ssl-wrapped bare http.server
   (bench/bare_tls_server.py) and, for the cost of TLS itself, both over plain HTTP.
2. The first handshake in a fresh `spk-visor --json node` process: https (certificate
   pinned in known_certs) against http to the same daemon, and curl -k against curl as the
   anchor for what one handshake costs without Python; then the same first request
   in-process (a fresh transport each time), free of the interpreter's start-up noise.

The figures to read are the ratios; absolute numbers depend on this shared machine.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.cli import Job, bench_env, cli_argv, measure
from bench.daemon import Result
from spk_visor.transport.http import HttpTransport
from tests.support.daemon import Daemon, DaemonEnv, kill_vmms

CONCURRENCY = (1, 10, 50)
WRK_LINE = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def load_wrk(url: str, clients: int, seconds: float, token: str | None) -> Result:
    argv = ["wrk", "--latency", f"-c{clients}", f"-t{min(clients, 2)}",
            f"-d{max(1, round(seconds))}s"]  # fmt: skip
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(
        [*argv, url], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = {m.group(1): float(m.group(2)) * UNIT_MS[m.group(3)] for m in WRK_LINE.finditer(out)}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(bad.group(1)) if bad else 0
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    return Result(rps, pct["50"], pct["99"], errors)


def load_python(url: str, clients: int, seconds: float, token: str | None) -> Result:
    """Keep-alive clients on this process's threads (when wrk is missing)."""
    scheme, _, rest = url.partition("://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at = time.monotonic() + seconds

    def connect() -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(host, int(port), timeout=10, context=ctx)
        return http.client.HTTPConnection(host, int(port), timeout=10)

    def worker(i: int) -> None:
        conn = connect()
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/" + path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors[i] += 1
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = connect()
                continue
            latencies[i].append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    lat = sorted(x for per in latencies for x in per)
    if not lat:
        return Result(0.0, float("nan"), float("nan"), sum(errors))
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return Result(len(lat) / elapsed, statistics.median(lat) * 1000, p99 * 1000, sum(errors))


def start(argv: list[str]) -> tuple[subprocess.Popen[str], int]:
    # The anchors print a traceback per connection wrk resets at the end of a cell.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def throughput(args: argparse.Namespace, daemon: Daemon, env: DaemonEnv) -> None:
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    measure_one = load_wrk if use_wrk else load_python
    bare, bare_port = start([sys.executable, "-m", "bench.bare_server"])
    bare_tls, bare_tls_port = start(
        [sys.executable, "-m", "bench.bare_tls_server", str(env.tls_cert), str(env.tls_key)]
    )
    try:
        targets = {
            "bare http": (f"http://127.0.0.1:{bare_port}/", None),
            "bare https": (f"https://127.0.0.1:{bare_tls_port}/", None),
            "daemon http": (f"{daemon.url}/api/node", daemon.token),
            "daemon https": (f"{daemon.https_url}/api/node", daemon.token),
        }
        for url, token in targets.values():  # warm-up: the daemon's first /api/node
            load_python(url, 1, 0.3, token)
        client = "wrk" if use_wrk else "python threads"
        print(f"keep-alive GET, {args.seconds:g} s per cell, median of {args.repeats}; "
              f"client: {client}\n")  # fmt: skip
        print(f"{'target':<14}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
        worst: dict[str, float] = {}
        for clients in CONCURRENCY:
            samples: dict[str, list[Result]] = {name: [] for name in targets}
            for _ in range(args.repeats):
                for name, (url, token) in targets.items():
                    samples[name].append(measure_one(url, clients, args.seconds, token))
            rows = {n: sorted(r, key=lambda x: x.rps)[len(r) // 2] for n, r in samples.items()}
            for name, res in rows.items():
                print(f"{name:<14}{clients:>6}{res.rps:>10.0f}{res.p50_ms:>9.2f}"
                      f"{res.p99_ms:>9.2f}{res.errors:>8}")  # fmt: skip
            ratios = {
                "daemon https / bare https": rows["daemon https"].rps / rows["bare https"].rps,
                "daemon https / daemon http": rows["daemon https"].rps / rows["daemon http"].rps,
                "bare https / bare http": rows["bare https"].rps / rows["bare http"].rps,
            }
            for text, value in ratios.items():
                print(f"{'':<14}{clients:>6}  {text}: {value:.2f}x")
                worst[text] = min(worst.get(text, value), value)
        print()
        for text, value in worst.items():
            print(f"worst {text}: {value:.2f}x")
    finally:
        for proc in (bare, bare_tls):
            proc.terminate()
            proc.wait(timeout=5)


def first_handshake(args: argparse.Namespace, daemon: Daemon, root: Path) -> None:
    env = bench_env(root, root / "none.toml")
    env["SPK_VISOR_TOKEN"] = daemon.token
    env["SPK_VISOR_KNOWN_CERTS"] = str(root / "known_certs")
    cli = cli_argv()
    # Pin once, so the timed https runs are the everyday case: a known node.
    subprocess.run([*cli, "--node", daemon.https_url, "--accept-new", "--json", "node"],
                   env=env, check=True, capture_output=True, timeout=60)  # fmt: skip
    jobs = {
        "spk-visor http": Job((*cli, "--node", daemon.url, "--json", "node")),
        "spk-visor https": Job((*cli, "--node", daemon.https_url, "--json", "node")),
    }
    curl = shutil.which("curl")
    if curl:
        auth = f"Authorization: Bearer {daemon.token}"
        jobs["curl http"] = Job((curl, "-sf", "-H", auth, f"{daemon.url}/api/node"))
        jobs["curl -k https"] = Job((curl, "-sfk", "-H", auth, f"{daemon.https_url}/api/node"))
    timings = measure(jobs, env, args.runs)
    print(f"\nfresh process, one GET /api/node, median of {args.runs} runs\n")
    for name, timing in timings.items():
        print(f"{name:<18}{timing}")
    cost = timings["spk-visor https"].median - timings["spk-visor http"].median
    ratio = timings["spk-visor https"].median / timings["spk-visor http"].median
    print(f"\nfirst handshake in spk-visor --json node: +{cost * 1000:.1f} ms ({ratio:.2f}x http)")
    if curl:
        anchor = timings["curl -k https"].median - timings["curl http"].median
        print(f"the same in curl (anchor): +{anchor * 1000:.1f} ms")


def first_request_in_process(daemon: Daemon, root: Path, runs: int) -> None:
    """The same first request without the interpreter's start-up around it: a fresh
    transport (new session, new connection) per sample, http and https in turns."""
    os.environ["SPK_VISOR_KNOWN_CERTS"] = str(root / "known_certs")  # pinned above
    headers = {"Authorization": f"Bearer {daemon.token}"}
    samples: dict[str, list[float]] = {"http": [], "https": []}
    for _ in range(runs):
        for name, url in (("http", daemon.url), ("https", daemon.https_url)):
            t0 = time.perf_counter()
            transport = HttpTransport(url, timeout=10)
            reply = transport.request("GET", "/api/node", headers=headers)
            transport.close()
            samples[name].append(time.perf_counter() - t0)
            if reply.status != 200:
                raise SystemExit(f"{url}: {reply.status}")
    http_ms, https_ms = (statistics.median(samples[k]) * 1000 for k in ("http", "https"))
    print(
        f"\nin-process first request on a fresh connection, median of {runs}: "
        f"http {http_ms:.1f} ms, https {https_ms:.1f} ms (+{https_ms - http_ms:.1f} ms)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per throughput cell")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (median kept)")
    parser.add_argument("--runs", type=int, default=9, help="CLI runs per command")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="svtlsbench"))
    env = DaemonEnv(root / "node")
    daemon = Daemon(env)
    try:
        throughput(args, daemon, env)
        first_handshake(args, daemon, root)
        first_request_in_process(daemon, root, max(args.runs, 30))
    finally:
        daemon.stop()
        kill_vmms(env.run_dir)
        env.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
