"""A thousand nodes pulling updates from nginx: what the origin serves, how rollouts land,
how jitter spreads the load.

    .venv/bin/python -m bench.fleet [--nodes 1000] [--parallel 16] [--jitter 5]

Each simulated node is its own SPK_VISOR_OTA_SYSROOT (trust root, ota.conf with its own
node_id, store) and runs the real `ota pull` code (spk_visor.ota.pull.run) in
download-and-verify mode (apply_daemon = false, stage_base = false), so every request is
one a real node would make. nginx serves the repository with docs/nginx-ota-origin.conf;
its access log is the origin's own count of requests and bytes.

Phases, every node pulling in each:
  setup       release 1 at 100 %; every node downloads it (not reported)
  no change   nothing published: what a cron run costs an up-to-date fleet
  rollout 10  release 2 published at --rollout 10, then the channel widened to 50, 100
  jitter      the no-change run again, each node waiting a random 0..--jitter s first
              (the cron default spreads over minutes; the bench compresses it)

Goals (issue 14): a no-change pull <= 2 requests and <= 1 KiB per node; each node that
takes a release downloads each blob once; each rollout step within +-2 points of target.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import figures
from spk_visor.errors import SpkVisorError
from spk_visor.ota import pull
from spk_visor.ota.context import OtaContext
from spk_visor.ota.nodeconf import NodePaths, load_config
from spk_visor.ota.repo import Repo
from spk_visor.ota.store import BlobStore
from tests.support.nginx import Hit, Nginx
from tests.support.ota_pki import Pki, make_bundle

WEEK = dt.timedelta(days=7)


def tree(base: Path, version: str, size: int) -> Path:
    path = base / f"tree-{version}"
    (path / "bin").mkdir(parents=True)
    launcher = path / "bin" / "smechvisord"
    launcher.write_bytes(b"#!/bin/sh\n#" + os.urandom(size))
    launcher.chmod(0o755)
    (path / "lib").mkdir()
    (path / "lib" / "VERSION").write_text(version + "\n")
    return path


def publish(base: Path, pki: Pki, repo: Repo, counter: int, size: int, percent: float) -> str:
    version = f"0.{counter}.0"
    built = make_bundle(
        base,
        pki,
        counter=counter,
        version=version,
        tree=tree(base, version, size),
        name=f"r{counter}.spkb",
    )
    sha, _m = repo.add_bundle(built.bundle)
    repo.sign_channel("stable", pki.channel, manifest_sha=sha, expires_in=WEEK, percent=percent)
    return sha


def make_node(base: Path, pki: Pki, index: int, url: str) -> Path:
    sysroot = base / f"n{index:04d}"
    paths = NodePaths(sysroot)
    paths.factory_root.parent.mkdir(parents=True, exist_ok=True)
    paths.factory_root.write_bytes(pki.root_env().to_bytes())
    BlobStore(paths).ensure()
    paths.conf.parent.mkdir(parents=True, exist_ok=True)
    conf = {
        "base_urls": [url],
        "node_id": f"node-{index:04d}",
        "apply_daemon": False,
        "stage_base": False,
        "fetch_timeout_s": 30,
    }
    paths.conf.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in conf.items()))
    return sysroot


def pull_one(sysroot: Path, jitter: float) -> str:
    """What the node did: the manifest it verified, 'unchanged', or the error's class."""
    paths = NodePaths(sysroot)
    ctx = OtaContext(paths, load_config(paths))
    opts = pull.PullOptions(interactive=jitter <= 0, jitter=jitter)
    try:
        _code, doc = pull.run(ctx, opts)
    except SpkVisorError as e:
        return type(e).__name__
    if doc.get("reason") == "already installed" or not doc.get("changed", True):
        manifest = doc.get("manifest")
        return str(manifest) if doc.get("downloaded") else f"unchanged:{manifest}"
    return str(doc.get("manifest"))


def run_phase(
    nodes: list[Path], parallel: int, origin: Nginx, jitter: float = 0.0
) -> tuple[collections.Counter[str], list[Hit], float]:
    before = len(origin.hits())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        outcomes = collections.Counter(pool.map(lambda n: pull_one(n, jitter), nodes))
    wall = time.perf_counter() - t0
    time.sleep(0.2)  # nginx writes each log line as its request ends
    return outcomes, origin.hits()[before:], wall


def report(name: str, nodes: int, hits: list[Hit], wall: float) -> None:
    total = sum(h.sent for h in hits)
    by_status = collections.Counter(h.status for h in hits)
    print(
        f"{name:<14} {len(hits):6d} req {len(hits) / nodes:5.2f}/node "
        f"{total / 1024:10.1f} KiB {total / nodes:9.0f} B/node  {wall:6.1f} s  "
        f"statuses {dict(sorted(by_status.items()))}"
    )


def peak_rate(hits: list[Hit], window: float = 1.0) -> float:
    """The most requests that ended within any `window` seconds, per second."""
    times = sorted(h.at for h in hits)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best / window


def span(hits: list[Hit]) -> float:
    return max(h.at for h in hits) - min(h.at for h in hits) if hits else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--jitter", type=float, default=5.0, help="compressed jitter window, s")
    parser.add_argument("--blob-kib", type=int, default=64)
    args = parser.parse_args()
    figures.print_load("before")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        pki = Pki()
        repo = Repo(base / "repo")
        sha1 = publish(base, pki, repo, 1, args.blob_kib << 10, 100)
        with Nginx(repo.root, base / "nginx") as origin:
            nodes = [make_node(base, pki, i, origin.url) for i in range(args.nodes)]
            print(f"{args.nodes} nodes, {args.parallel} pulling at once, origin {origin.url}")
            outcomes, hits, wall = run_phase(nodes, args.parallel, origin)
            if outcomes != collections.Counter({sha1: args.nodes}):
                raise SystemExit(f"setup: not every node took release 1: {dict(outcomes)}")
            report("setup", args.nodes, hits, wall)

            outcomes, hits, wall = run_phase(nodes, args.parallel, origin)
            report("no change", args.nodes, hits, wall)
            no_change_req = len(hits) / args.nodes
            no_change_bytes = sum(h.sent for h in hits) / args.nodes
            if wall <= 0 or not hits:
                raise figures.AbsurdFigure("no-change phase made no request")

            sha2 = publish(base, pki, repo, 2, args.blob_kib << 10, 10)
            blobs2 = set(repo.load_manifest(sha2).blobs)
            took: set[Path] = set()
            accuracy: list[str] = []
            fetched: collections.Counter[str] = collections.Counter()
            for step in (10, 50, 100):
                if step != 10:
                    repo.sign_channel("stable", pki.channel, manifest_sha=None, expires_in=WEEK,
                                      percent=step)  # fmt: skip
                before = len(origin.hits())
                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.parallel) as pool:
                    results = list(pool.map(lambda n: (n, pull_one(n, 0.0)), nodes))
                wall = time.perf_counter() - t0
                time.sleep(0.2)
                hits = origin.hits()[before:]
                took |= {n for n, outcome in results if outcome.startswith(sha2)}
                for h in hits:
                    if "/blobs/" in h.path and h.status in (200, 206):
                        fetched[h.path] += 1
                report(f"rollout {step}", args.nodes, hits, wall)
                share = 100 * len(took) / args.nodes
                accuracy.append(
                    f"{step}%: {share:.1f}% took it ({share - step:+.1f} points)"
                    + ("" if abs(share - step) <= 2 else "  MISSED")
                )
            blob_fetches = sum(fetched[p] for p in fetched if p.rsplit("/", 1)[1] in
                               {b.split(":", 1)[1] for b in blobs2})  # fmt: skip
            print("rollout accuracy: " + "; ".join(accuracy))
            print(
                f"release 2 blob downloads: {blob_fetches} for {len(took)} nodes x "
                f"{len(blobs2)} blob(s) (each exactly once: "
                f"{'yes' if blob_fetches == len(took) * len(blobs2) else 'NO'})"
            )

            # As cron starts them: every node at once, one thread each, with and without the
            # random wait before the first request.
            at_once = min(len(nodes), 1000)
            _o, flat, _w = run_phase(nodes, at_once, origin)
            _o, spread, wall_j = run_phase(nodes, at_once, origin, jitter=args.jitter)
            # nginx stamps a log line with its cached clock, which a loaded machine updates
            # in steps: a one-second window smooths that out.
            print(
                f"jitter: peak {peak_rate(flat):.0f} req/s over {span(flat):.1f} s without, "
                f"{peak_rate(spread):.0f} req/s over {span(spread):.1f} s with a "
                f"{args.jitter:g} s window ({wall_j:.1f} s wall)"
            )
    print(
        f"goal: no-change pull <= 2 requests and <= 1024 B per node: "
        f"{no_change_req:.2f} req, {no_change_bytes:.0f} B "
        f"({'met' if no_change_req <= 2 and no_change_bytes <= 1024 else 'missed'})"
    )
    figures.print_load("after")


if __name__ == "__main__":
    main()
