"""Variants of the image writer's settings against each other and dd, in one run.

    sudo SPK_BENCH_AB='128M:SYNC_BYTES=128M;512M:SYNC_BYTES=512M;end:SYNC_BYTES=0' \\
        .venv/bin/python -m bench.writer_ab

bench.ota_slots measures the writer as it is; this one answers "would another setting
be faster" with the noise of a shared machine in view. Each variant sets module
constants of spk_visor/install/image.py for its stages (`NAME:KEY=VALUE,KEY=VALUE`,
variants separated by `;`; a value may end in K or M; SYNC_BYTES=0 flushes only once,
at the end of the stream) and the variants take turns with the anchor, `dd oflag=direct
conv=fsync` of the same raw image to the same slot: in round i the order is the list
rotated by i, so each side takes each position in turn and a drift in the machine's
speed hits all alike. Each stage is a whole `slots.stage` (discarded first), the blob
evicted from the page cache first (SPK_BENCH_AB_COND=warm: loaded first instead), as
bench.ota_slots' cold condition.

Printed per side: every time, the median, the range and median(dd) / median(side); for
the stages also the writer's stream wall time and its syncer's busy seconds, and the
bytes `vda`-like disks read and wrote during the stage (/sys/block/*/stat of the disk
under the slot's backing file), which tells whether the read-back came from the disk or
from the backing file's page cache. A difference between variants smaller than their
ranges is noise, not a result. `--direct-io` attaches the loop device with `losetup
--direct-io=on` (bench/loop_mode.py; `loop_direct_io` says which mode ran).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import figures, loop_mode, ota_slots
from spk_visor.install import image as image_writer
from spk_visor.ota import slots
from tests.support import ota_slots_worker as node
from tests.support.abdisk import ab_disk

MIB = 1 << 20
AB_ENV = "SPK_BENCH_AB"
COND_ENV = "SPK_BENCH_AB_COND"
DEFAULT_AB = "128M:SYNC_BYTES=128M;512M:SYNC_BYTES=512M;end:SYNC_BYTES=0"
# Flush only at the end: no count of checked bytes reaches this between two flushes.
NEVER = 1 << 62
UNITS = {"K": 1 << 10, "M": MIB}


def parse(spec: str) -> dict[str, dict[str, int]]:
    """`NAME:KEY=VALUE,...;...` -> {name: {KEY: value}}; every KEY must be a constant of
    image.py, so a typo fails the bench instead of measuring the default twice."""
    out: dict[str, dict[str, int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, settings = part.partition(":")
        values: dict[str, int] = {}
        for item in filter(None, settings.split(",")):
            key, _, raw = item.partition("=")
            if not isinstance(getattr(image_writer, key, None), int):
                raise SystemExit(f"{AB_ENV}: {key} is no integer constant of image.py")
            scale = UNITS.get(raw[-1:].upper(), 1)
            value = int(raw[:-1] if scale > 1 else raw) * scale
            values[key] = NEVER if key == "SYNC_BYTES" and value == 0 else value
        out[name] = values
    if not out:
        raise SystemExit(f"{AB_ENV}: no variant")
    return out


def run(direct_io: bool = False) -> dict[str, object]:
    size_mib = int(os.environ.get(ota_slots.SIZE_ENV, "1024"))
    rounds = int(os.environ.get(ota_slots.ROUNDS_ENV, "3"))
    cond = os.environ.get(COND_ENV, ota_slots.COLD)
    variants = parse(os.environ.get(AB_ENV, DEFAULT_AB))
    defaults = {k: getattr(image_writer, k) for v in variants.values() for k in v}
    with tempfile.TemporaryDirectory(prefix="spk-bench-ab-") as tmp:
        work = Path(tmp)
        if direct_io:
            loop_mode.probe(work)
        raw = ota_slots.build_image(work, size_mib)
        blob = work / "raw.img.zst"
        ota_slots.encode(raw, blob, threads=-1)
        host = loop_mode.HostDisk.under(work)
        with ab_disk(work, slot_mib=size_mib + 4, esp_mib=1, direct_io=direct_io) as ab:
            mode = loop_mode.figures(ab.loop)
            ctx = node.node(work / "root", ab.root_a, ab.root_b)
            pub = node.publish(ctx, raw, encoded=blob)
            store_blob = ctx.store.path(pub.blob_id)
            times: dict[str, list[float]] = {"dd": [], **{n: [] for n in variants}}
            extra: dict[str, dict[str, list[float]]] = {n: {} for n in variants}

            def note(name: str, key: str, value: float) -> None:
                extra[name].setdefault(key, []).append(round(value, 3))

            def dd() -> None:
                times["dd"].append(
                    ota_slots.dd(raw, ab.root_b, ["oflag=direct", "conv=fsync"], cond)
                )

            def stage(name: str) -> Callable[[], None]:
                def go() -> None:
                    for key, value in variants[name].items():
                        setattr(image_writer, key, value)
                    try:
                        slots.discard(ctx)
                        ota_slots.prepare(store_blob, cond)
                        t0 = time.perf_counter()
                        code = host.around(
                            name, lambda: slots.stage(ctx, pub.manifest, pub.manifest_hex)
                        )
                        t = time.perf_counter() - t0
                    finally:
                        for key, value in defaults.items():
                            setattr(image_writer, key, value)
                    assert code == 4, code
                    writer = ota_slots._Recorded.last
                    assert writer is not None
                    got = writer.figures()
                    times[name].append(t)
                    note(name, "stream_s", got["stream"]["wall_s"])
                    note(name, "sync_busy_s", got["sync"]["busy_s"])
                    note(name, "decode_wait_s", got["decode"]["wait_s"])
                    note(name, "feed_wait_s", got["decode"].get("feed_wait_s", 0.0))
                    note(name, "decode_runqueue_s", got["decode"]["runqueue_s"])
                    note(name, "hash_cpu_s", got["hash"]["cpu_s"])
                    note(name, "hash_runqueue_s", got["hash"]["runqueue_s"])
                    note(name, "decode_cpu_s", got["decode"]["cpu_s"])
                    note(name, "write_busy_s", got["write"]["busy_s"])
                    note(name, "check_busy_s", got["check"]["busy_s"])
                    if name in host.moved:
                        note(name, "disk_read_mib", host.moved[name]["read_mib"][-1])
                        note(name, "disk_written_mib", host.moved[name]["written_mib"][-1])

                return go

            sides: list[Callable[[], None]] = [dd, *(stage(n) for n in variants)]
            figures.print_load("before")
            real_writer = image_writer.ImageWriter
            image_writer.ImageWriter = ota_slots._Recorded  # type: ignore[misc]
            try:
                for i in range(rounds):
                    k = i % len(sides)
                    for go in sides[k:] + sides[:k]:
                        go()
            finally:
                image_writer.ImageWriter = real_writer  # type: ignore[misc]
            figures.print_load("after")
            assert slots.verify_installed(ctx, pub.manifest.image, "b") == []  # type: ignore[arg-type]
    out: dict[str, object] = {
        "image_mib": size_mib,
        "rounds": rounds,
        "condition": cond,
        "disk": host.name,
        **mode,
    }
    for name, ts in times.items():
        side: dict[str, object] = {
            "s": [round(t, 3) for t in ts],
            "median_s": round(statistics.median(ts), 3),
            "range_s": [round(min(ts), 3), round(max(ts), 3)],
        }
        if name != "dd":
            side["settings"] = variants[name]
            side["ratio_vs_dd"] = round(figures.ratio(times["dd"], ts, name), 3)
            side.update(extra[name])
        out[name] = side
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writer_ab", description=__doc__)
    loop_mode.add_option(parser)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.writer_ab needs root (loop devices)", file=sys.stderr)
        return 2
    with loop_mode.refusal_exits():
        print(json.dumps(run(direct_io=args.direct_io), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
