"""Base staging (spk_visor.ota.slots.stage) of a realistic image to a loop-device A/B slot,
against `dd` writing the same raw bytes to the same partition, measured in the same run.

    sudo .venv/bin/python -m bench.ota_slots            # 1 GiB image
    SPK_BENCH_SLOT_MIB=256 sudo .venv/bin/python -m bench.ota_slots
    sudo .venv/bin/python -m bench.ota_slots --direct-io  # DIO loop (bench/loop_mode.py)

The image is a real ext4 filesystem (mkfs.ext4 -d) holding copies of files from /usr
(binaries, libraries, text: what a root filesystem compresses like), a share of random
files (already-compressed content: firmware, archives, media) and free space (zeros). It
is encoded with zstd level 3 as `spk-visor ota build` does; the encode speed is reported.

What each side does, per round (anchor and subject take turns going first; medians; the
slot is discarded before each stage, or the rounds after the first would find the image
staged and measure nothing; an absurd ratio fails the bench, see bench/figures.py):
  stage    journal, invalidate, read + sha256 the blob, zstd-decode, sha256 the raw
           stream, write the slot (O_DIRECT), per window fdatasync + read back + compare,
           head last, fsync, BLKFLSBUF, read the head back, set the grubenv one-shot
  dd       `dd if=RAW of=SLOT bs=4M conv=fsync` (page cache, then one fsync: the same
           durability as stage) and `dd ... oflag=direct conv=fsync` (reported too, and
           used for the strict ratio)
Both sides run under two conditions in every round, alternated (conditions and sides
take turns going first), so each ratio compares like with like:
  cold     the blob is evicted from the page cache (fdatasync, then posix_fadvise
           DONTNEED) before each stage, and the raw image before each dd: both read
           their input from the disk. The headline: the top-level keys are the cold ones.
  warm     the blob is read into the page cache (untimed) before each stage, as it is
           right after `ota pull` downloaded and verified it, and the raw image before
           each dd: neither reads its input from the disk. Under the `warm` key.
The share of each input in the page cache as each run starts (mincore) is reported
(`blob_cached_share`, `raw_cached_share_at_start`; `warm.*` likewise), and the blob's
after each stage: a cold blob the stage leaves uncached was not read into the cache.

The goal is stage >= 0.85x dd oflag=direct's throughput (ratio = dd time / stage time). Staging must
sha256 every raw byte once (and every blob byte once), dd hashes nothing: so the
in-run sha256 speed of this CPU is reported as well, raw_size / sha256_mbps being a floor
on stage's time that no buffering can lower. Stage's CPU seconds (all threads) are
reported too: on a machine shared with other work, wall time follows what it is given.

`image_bytes` says how much of the image body the writer wrote and how much it zeroed
(BLKZEROOUT, runs of zero blocks: the image's free space), dd writing every byte.

`threads` gives, per thread of the image writer (medians over the rounds), its busy and
waiting seconds, its CPU seconds and its run-queue seconds (ready to run, no CPU free),
and `busy_share` = busy / stream wall time: the thread whose busy share is near 1 is the
critical path, and a run-queue time near its busy time means it waited for a CPU, not
for the stage before it. `machine_busy_share` is the whole machine's busy CPU share
during each stage (/proc/stat, kernel threads included): well below 1.0, the stream waits
for something other than CPU.

`--direct-io` attaches the loop device with `losetup --direct-io=on` (bench/loop_mode.py;
`loop_direct_io` says which mode ran): dd, the stage and the I/O floor then read and
write the disk under the loop file, not its page cache. `host_disk_mib` gives the MiB
that disk read and wrote during each stage, dd oflag=direct and replay: with direct I/O
the stage's read-back shows up as reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import figures, floors, loop_mode
from spk_visor.install import blockdev
from spk_visor.install import image as image_writer
from spk_visor.ota import slots
from tests.support import ota_slots_worker as node
from tests.support.abdisk import ab_disk
from tests.support.zstd_image import evict

MIB = 1 << 20
SIZE_ENV = "SPK_BENCH_SLOT_MIB"
ROUNDS_ENV = "SPK_BENCH_ROUNDS"
GOAL_RATIO = 0.85  # against dd oflag=direct conv=fsync
# Shares of the image: random (incompressible) files, copies of /usr files; the rest of
# the filesystem stays free (zeros).
RANDOM_SHARE = 0.25
USR_SHARE = 0.40
# Both conditions run in every round (see the module's docstring); cold is the headline.
COLD, WARM = "cold", "warm"


def _load(path: Path) -> None:
    """Read `path` into the page cache (untimed): as a blob is right after `ota pull`
    downloaded and verified it."""
    with path.open("rb", buffering=0) as f:
        while f.read(16 * MIB):
            pass


def cached_share(path: Path) -> float:
    """The share of `path`'s pages in the page cache now (mincore)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = blockdev.cached_pages(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return pages.count(1) / len(pages) if pages else 1.0


def prepare(path: Path, cond: str) -> float:
    """`path` evicted ("cold") or loaded ("warm") before a timed run; the share of it
    cached at the start of the run, reported so a figure says what it measured."""
    if cond == COLD:
        evict(path)
    else:
        _load(path)
    return cached_share(path)


def _fill_tree(root: Path, size: int) -> None:
    rng = random.Random(20260901)
    rand_dir = root / "var" / "lib" / "firmware"
    rand_dir.mkdir(parents=True)
    left = int(size * RANDOM_SHARE)
    i = 0
    while left > 0:
        n = min(left, rng.randint(1, 16) * MIB)
        (rand_dir / f"blob{i:04d}.bin").write_bytes(os.urandom(n))
        left -= n
        i += 1
    left = int(size * USR_SHARE)
    usr = root / "usr"
    for top in ("/usr/lib", "/usr/bin", "/usr/share", "/usr/sbin"):
        for dirpath, _dirs, files in os.walk(top):
            for name in sorted(files):
                src = Path(dirpath) / name
                if left <= 0:
                    return
                try:
                    if not src.is_file() or src.is_symlink():
                        continue
                    n = src.stat().st_size
                    if n == 0 or n > left:
                        continue
                    dst = usr / src.relative_to("/usr")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
                except OSError:
                    continue
                left -= n


def build_image(work: Path, size_mib: int) -> Path:
    tree = work / "tree"
    tree.mkdir()
    _fill_tree(tree, size_mib * MIB)
    image = work / "raw.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), f"{size_mib}M"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    shutil.rmtree(tree)
    return image


def encode(raw: Path, out: Path, threads: int) -> float:
    """zstd level 3 (what the build side uses); returns raw MB/s."""
    evict(raw)
    t0 = time.perf_counter()
    node.encode(raw, out, level=3, threads=threads)
    return raw.stat().st_size / (time.perf_counter() - t0) / 1e6


def dd(
    raw: Path, device: str, flags: list[str], cond: str = COLD, seen: list[float] | None = None
) -> float:
    """`dd` of `raw` to `device`, `raw` evicted first (cold) or loaded (warm); the share
    of it cached as dd starts goes to `seen`."""
    share = prepare(raw, cond)
    if seen is not None:
        seen.append(share)
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", f"if={raw}", f"of={device}", "bs=4M", *flags, "status=none"],
        check=True,
        timeout=600,
    )
    return time.perf_counter() - t0


def sha256_mbps() -> float:
    data = os.urandom(256 * MIB)
    t0 = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / (time.perf_counter() - t0) / 1e6


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Recorded(image_writer.ImageWriter):
    """The image writer, remembered so the bench can read its clocks after a stage."""

    last: image_writer.ImageWriter | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _Recorded.last = self


def thread_figures(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median of each thread's figures over the rounds, with its busy share of the stream."""
    out: dict[str, dict[str, float]] = {}
    wall = statistics.median(r["stream"]["wall_s"] for r in runs)
    for name in runs[0]:
        if name in ("stream", "bytes"):
            continue
        fig = {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]}
        if "busy_s" in fig:
            fig["busy_share"] = fig["busy_s"] / wall if wall > 0 else 0.0
        out[name] = {k: round(v, 2) for k, v in fig.items()}
    out["stream"] = {"wall_s": round(wall, 2)}
    return out


def byte_figures(runs: list[dict[str, dict[str, float]]]) -> dict[str, object]:
    """How the image's body reached the device in the last round: written (pwrite) or
    zeroed (BLKZEROOUT, runs of zero blocks). dd writes every byte, so the ratio against
    it depends on the image's share of zeros; printed beside the ratio."""
    got = runs[-1].get("bytes", {}) if runs else {}
    written, zeroed = int(got.get("written_bytes", 0)), int(got.get("zeroed_bytes", 0))
    total = written + zeroed
    return {
        "written_bytes": written,
        "zeroed_bytes": zeroed,
        "zeroed_share": round(zeroed / total, 3) if total else 0.0,
        "note": "dd writes every byte; the writer zeroes runs of zero blocks instead "
        "of writing them, and reads them back all the same",
    }


@dataclass
class _Runs:
    """One condition's rounds (cold or warm)."""

    times: dict[str, list[float]] = field(
        default_factory=lambda: {"stage": [], "dd_fsync": [], "dd_direct_fsync": []}
    )
    cpu: list[float] = field(default_factory=list)
    # The whole machine's busy CPU share during each stage (/proc/stat, the loop
    # device's kernel worker included): near 1.0, no idle core was left.
    busy: list[float] = field(default_factory=list)
    dd_cpu: list[float] = field(default_factory=list)
    clocks: list[dict[str, dict[str, float]]] = field(default_factory=list)
    write_phase: list[float] = field(default_factory=list)
    verify_phase: list[float] = field(default_factory=list)
    # Share of the input in the page cache as each run starts (raw: dd's; blob: stage's),
    # and of the blob after each stage.
    cached: dict[str, list[float]] = field(default_factory=lambda: {"raw": [], "blob": []})
    blob_cached_after: list[float] = field(default_factory=list)

    def cached_figures(self) -> dict[str, list[float]]:
        return {
            "at_start": [round(c, 3) for c in self.cached["blob"]],
            "after_stage": [round(c, 3) for c in self.blob_cached_after],
        }

    def summary(self, raw_size: int) -> dict[str, object]:
        """The figures of one condition, for its own key (the cold ones are top-level)."""
        ratio = figures.ratio(self.times["dd_direct_fsync"], self.times["stage"], "warm stage")
        med = {k: statistics.median(v) for k, v in self.times.items()}
        read = thread_figures(self.clocks).get("blob-read", {})
        return {
            "stage_s": [round(t, 2) for t in self.times["stage"]],
            "stage_cpu_s": [round(t, 2) for t in self.cpu],
            "machine_busy_share": [round(b, 2) for b in self.busy],
            "dd_fsync_s": [round(t, 2) for t in self.times["dd_fsync"]],
            "dd_direct_fsync_s": [round(t, 2) for t in self.times["dd_direct_fsync"]],
            "dd_direct_cpu_s": [round(t, 2) for t in self.dd_cpu],
            "stage_mbps": round(raw_size / med["stage"] / 1e6, 1),
            "dd_direct_fsync_mbps": round(raw_size / med["dd_direct_fsync"] / 1e6, 1),
            "ratio_vs_dd_fsync": round(med["dd_fsync"] / med["stage"], 2),
            "ratio_vs_dd_direct_fsync": round(ratio, 2),
            "goal_met": ratio >= GOAL_RATIO,
            "blob_read_thread": read,
            "raw_cached_share_at_start": [round(c, 3) for c in self.cached["raw"]],
            "blob_cached_share": self.cached_figures(),
        }


def run(direct_io: bool = False) -> dict[str, object]:
    size_mib = int(os.environ.get(SIZE_ENV, "1024"))
    rounds = int(os.environ.get(ROUNDS_ENV, "3"))
    with tempfile.TemporaryDirectory(prefix="spk-bench-slots-") as tmp:
        work = Path(tmp)
        if direct_io:
            loop_mode.probe(work)
        t0 = time.perf_counter()
        raw = build_image(work, size_mib)
        build_s = time.perf_counter() - t0
        raw_size = raw.stat().st_size
        blob = work / "raw.img.zst"
        enc_mt = encode(raw, blob, threads=-1)
        enc_st = encode(raw, work / "st.zst", threads=0)
        (work / "st.zst").unlink()
        with ab_disk(work, slot_mib=size_mib + 4, esp_mib=1, direct_io=direct_io) as disk:
            mode = loop_mode.figures(disk.loop)
            host = loop_mode.HostDisk.under(work)
            ctx = node.node(work / "root", disk.root_a, disk.root_b)
            pub = node.publish(ctx, raw, encoded=blob)
            store_blob = ctx.store.path(pub.blob_id)
            marks: dict[str, float] = {}
            ctx.emit = lambda ev, f: (
                marks.__setitem__(str(f["phase"]), time.perf_counter()) if ev == "phase" else None
            )
            by = {COLD: _Runs(), WARM: _Runs()}
            # The I/O floor (bench/floors.py): the writer's device I/O for this image,
            # replayed from memory onto the same slot, beside the stage in every round.
            raw_mem = floors.load(raw)
            io_plan = floors.plan(raw_mem, raw_size)
            io_floor: list[float] = []
            io_cpu: list[float] = []

            def replay() -> None:
                wall, machine_cpu = host.around(
                    "io_floor", lambda: floors.machine_replay(disk.root_b, raw_mem, io_plan)
                )
                io_floor.append(wall)
                io_cpu.append(machine_cpu)

            def anchor(cond: str) -> float:
                r = by[cond]
                seen = r.cached["raw"]
                r.times["dd_fsync"].append(dd(raw, disk.root_b, ["conv=fsync"], cond, seen))
                c0 = _children_cpu_s()
                direct = ["oflag=direct", "conv=fsync"]
                t = host.around(
                    f"dd_direct_{cond}", lambda: dd(raw, disk.root_b, direct, cond, seen)
                )
                r.dd_cpu.append(_children_cpu_s() - c0)
                r.times["dd_direct_fsync"].append(t)
                return t

            def subject(cond: str) -> float:
                r = by[cond]
                # The replay takes turns with the cold stage (the headline), so it runs
                # once a round.
                replay_first = cond == COLD and len(r.cpu) % 2 == 1
                if replay_first:
                    replay()
                # Without a discard the next round finds the image staged and returns at
                # once (what made rounds 2 and 3 report 19x and 57x).
                slots.discard(ctx)
                r.cached["blob"].append(prepare(store_blob, cond))
                t0, c0, m0 = time.perf_counter(), _cpu_s(), figures.machine_cpu_s()
                code = host.around(
                    f"stage_{cond}", lambda: slots.stage(ctx, pub.manifest, pub.manifest_hex)
                )
                t = time.perf_counter() - t0
                r.cpu.append(_cpu_s() - c0)
                r.busy.append((figures.machine_cpu_s() - m0) / (t * (os.cpu_count() or 1)))
                assert code == 4, code
                assert _Recorded.last is not None
                r.clocks.append(_Recorded.last.figures())
                r.write_phase.append(marks["verifying"] - marks["writing"])
                r.verify_phase.append(marks["staged"] - marks["verifying"])
                r.blob_cached_after.append(cached_share(store_blob))
                r.times["stage"].append(t)
                if cond == COLD and not replay_first:
                    replay()
                return t

            figures.print_load("before")
            real_writer = image_writer.ImageWriter
            image_writer.ImageWriter = _Recorded  # type: ignore[misc]
            try:
                # Conditions and sides take turns going first, so a drift in the
                # machine's speed hits all four alike.
                for i in range(rounds):
                    for cond in (COLD, WARM) if i % 2 == 0 else (WARM, COLD):
                        for side in (anchor, subject) if i % 2 == 0 else (subject, anchor):
                            side(cond)
            finally:
                image_writer.ImageWriter = real_writer  # type: ignore[misc]
            figures.print_load("after")
            assert slots.verify_installed(ctx, pub.manifest.image, "b") == []  # type: ignore[arg-type]
            hash_mbps = sha256_mbps()
            cpu_floor = floors.cpu_floor(raw_mem, raw_size, store_blob)
            load = os.getloadavg()[0]
        cold = by[COLD]
        times, cpu, busy, clocks = cold.times, cold.cpu, cold.busy, cold.clocks
        write_phase, verify_phase, dd_cpu = cold.write_phase, cold.verify_phase, cold.dd_cpu
        direct_ratio = figures.ratio(times["dd_direct_fsync"], times["stage"], "stage vs dd")
        med = {k: statistics.median(v) for k, v in times.items()}
        io_floor_s = statistics.median(io_floor)
        goal = floors.verdict(
            goal=GOAL_RATIO,
            measured_ratio=direct_ratio,
            anchor_s=med["dd_direct_fsync"],
            subject_s=med["stage"],
            io_floor_s=io_floor_s,
            cpu_floor_s=cpu_floor.floor_s,
            shared_s=floors.shared_floor_s(
                cpu_floor.sum_s,
                statistics.median(io_cpu),
                os.cpu_count() or 1,
            ),
        )
        mbps = {k: raw_size / v / 1e6 for k, v in med.items()}
        return {
            "image_mib": size_mib,
            **mode,
            "image_build_s": round(build_s, 1),
            "blob_mib": round(blob.stat().st_size / MIB, 1),
            "compression_ratio": round(raw_size / blob.stat().st_size, 2),
            "zstd_encode_mbps_threads_all": round(enc_mt, 1),
            "zstd_encode_mbps_single_thread": round(enc_st, 1),
            "rounds": rounds,
            "stage_s": [round(t, 2) for t in times["stage"]],
            "stage_cpu_s": [round(t, 2) for t in cpu],
            "machine_busy_share": [round(b, 2) for b in busy],
            "dd_direct_cpu_s": [round(t, 2) for t in dd_cpu],
            "threads": thread_figures(clocks),
            "stage_write_phase_s": [round(t, 2) for t in write_phase],
            "stage_verify_phase_s": [round(t, 2) for t in verify_phase],
            "dd_fsync_s": [round(t, 2) for t in times["dd_fsync"]],
            "dd_direct_fsync_s": [round(t, 2) for t in times["dd_direct_fsync"]],
            "stage_mbps": round(mbps["stage"], 1),
            "dd_fsync_mbps": round(mbps["dd_fsync"], 1),
            "dd_direct_fsync_mbps": round(mbps["dd_direct_fsync"], 1),
            "ratio_vs_dd_fsync": round(med["dd_fsync"] / med["stage"], 2),
            "ratio_vs_dd_direct_fsync": round(direct_ratio, 2),
            "goal_ratio": GOAL_RATIO,
            "goal_met": direct_ratio >= GOAL_RATIO,
            "image_bytes": byte_figures(clocks),
            "sha256_mbps": round(hash_mbps, 1),
            "stage_floor_s_from_sha256": round(raw_size / hash_mbps / 1e6, 2),
            "io_floor_s": [round(t, 2) for t in io_floor],
            "io_floor_machine_cpu_s": [round(t, 2) for t in io_cpu],
            **host.figures(),
            "cpu_floor": cpu_floor.figures(),
            "goal_vs_floors": goal,
            "load_average_1min_at_end": round(load, 2),
            "blob_cached_share": cold.cached_figures(),
            "raw_cached_share_at_start": [round(c, 3) for c in cold.cached["raw"]],
            WARM: by[WARM].summary(raw_size),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ota_slots", description=__doc__)
    loop_mode.add_option(parser)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.ota_slots needs root (loop devices)", file=sys.stderr)
        return 2
    with loop_mode.refusal_exits():
        print(json.dumps(run(direct_io=args.direct_io), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
