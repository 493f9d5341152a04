"""OTA benchmarks, one run, each a ratio against an anchor measured in the same run.

    make bench-ota        # or: .venv/bin/python -m bench.ota [--size-mib 1024] [--only verify]

- verify: `spk-visor ota verify`'s work (header, signatures, every blob hashed, the end
  of the file) on a bundle of --size-mib, against hashlib sha256 of the same bytes read
  the same way (goal >= 0.8x). The page cache is warm for both (read once before).
- push, swap, slots: from bench/ota_push.py, bench/ota_swap.py and bench/ota_slots.py
  (they need root: sshd on loopback, OpenRC, loop devices).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spk_visor.ota import bundle, verify
from spk_visor.ota.engine import hash_blobs
from spk_visor.trust import roots
from tests.support.ota_pki import Pki, make_bundle

GOAL_VERIFY_RATIO = 0.8
PARTS = ("push", "swap", "slots")


def _write_random(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for i in range(size >> 20):
            # Vary each MiB a little so no layer can dedupe it.
            f.write(i.to_bytes(8, "little") + block[8:])


def _sha256_file(path: Path) -> float:
    start = time.perf_counter()
    digest = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return time.perf_counter() - start


def _verify_bundle(path: Path, root: roots.Root) -> float:
    start = time.perf_counter()
    with path.open("rb") as f:
        header = bundle.read_header(f)
        v = verify.verify_manifest(header.manifest, root, start=dt.datetime.now(dt.UTC))
        hash_blobs(f, v.manifest)
    return time.perf_counter() - start


def bench_verify(size_mib: int, rounds: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ota-") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        (tree / "bin").mkdir(parents=True)
        _write_random(tree / "bin" / "payload", size_mib << 20)
        pki = Pki()
        root = roots.load_anchor(pki.root_env().to_bytes(), "bench root")
        built = make_bundle(work, pki, tree=tree)
        (tree / "bin" / "payload").unlink()
        size = built.bundle.stat().st_size
        _sha256_file(built.bundle)  # warm the page cache for both
        ours, anchor = [], []
        for _ in range(rounds):
            anchor.append(_sha256_file(built.bundle))
            ours.append(_verify_bundle(built.bundle, root))
    a, o = statistics.median(anchor), statistics.median(ours)
    return {
        "bundle_mib": size >> 20,
        "hashlib_mb_s": round(size / a / 1e6, 1),
        "verify_mb_s": round(size / o / 1e6, 1),
        "ratio": round(a / o, 3),
        "goal": GOAL_VERIFY_RATIO,
        "met": a / o >= GOAL_VERIFY_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--only", choices=("verify", *PARTS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    if args.only in (None, "verify"):
        results["verify"] = bench_verify(args.size_mib)
        print(f"verify: {results['verify']}", file=sys.stderr, flush=True)
    for part in PARTS:
        if args.only not in (None, part):
            continue
        try:
            module = importlib.import_module(f"bench.ota_{part}")
        except ImportError as e:
            results[part] = {"skipped": f"bench/ota_{part}.py: {e}"}
            continue
        if os.geteuid() != 0:
            results[part] = {"skipped": "needs root"}
            continue
        results[part] = module.run()
        print(f"{part}: {results[part]}", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
