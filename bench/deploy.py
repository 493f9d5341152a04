"""The deploy benchmark of issue 5, in one run:

    sudo .venv/bin/python -m bench.deploy [--skip-iso] [--skip-channel] [--mib 4096] [--direct-io]

1. channel: SecureChannel (AES-256-GCM, and ChaCha20-Poly1305 beside it) against raw TCP
   loopback of the same bytes (bench.deploy_channel, goal >= 0.7x). Needs no root.
2. deploy: a whole deploy of a realistic base image (bench.ota_slots.build_image: ext4
   with copies of /usr files, random files and free space; default 1 GiB) in a signed
   bundle (spk_visor.ota.build, zstd) from a donor process (`spk-visor deploy send`) to a
   receiver process (`spk-visor deploy receive --allow-loop --once`, reboot command
   recorded with `touch`) over 127.0.0.1, onto a 4 GiB loop device; against `dd if=RAW
   of=SLOT_A bs=4M oflag=direct conv=fsync` of the same raw image bytes to the slot A
   partition (root-a) the deploy just made on the same loop device. Goal: dd's time /
   deploy's time >= 0.5 for 1 GiB, >= 0.7 for 4 GiB. Root only.
3. iso: the Deploy Shim ISO's size and build time (bench.deploy_iso; --skip-iso).

`threads` gives the receiver's clocks of the image stream (medians over the rounds; see
bench.ota_slots and spk_visor/install/image.py): the image writer's threads (decode,
with `feed_wait_s`, its wait for records; hash, write, check, sync), `blob` (the
session thread waiting for room in the decoder's pipe, `put_wait_s`), `store` (the
`image-store` thread writing the blob's store copy and hashing it, `hash_s` of its busy
time; `put_wait_s`, the session thread waiting for room in its queue) and `session` (the
session thread during the image: `recv_s` in receive, `decrypt_s` of it in the AEAD,
`sink_s` handing records to the sink, which holds both `put_wait_s`; its CPU and
run-queue seconds); `threads_by_round`: the same clocks of each round (the first round is
slower, see docs/install-path.md). `image_bytes` says how much of the image body the
receiver wrote and how much it zeroed (BLKZEROOUT, the image's free space); dd writes every byte.
`machine_busy_share` is the whole machine's busy CPU share during each run (/proc/stat,
kernel threads included: the loop device's worker does the disk I/O): a deploy near 1.0
had no idle core left to go faster with.

The deploy is timed from the donor process's start (interpreter start-up included) to its
exit, which comes right after the target's REPORT ok: it includes the handshake, the
target's wipe, partitioning and mkfs, the stream (zstd decode, sha256 of blob and raw
bytes, O_DIRECT windows each flushed, read back and compared), the daemon pack and the
bootloader install. The donor's own figure (session start to REPORT ok) is reported
too, and the receiver's events give the breakdown (`phases_s`): `start-up+handshake`
(donor start to the target's `connected`: interpreter, imports, bundle header, connect,
SPAKE2), `hello+plan` (to `plan_ok`: the HELLO inventory, the PLAN's validation and
signature check), `plan_ok` (to the first disk phase), the disk phases, and `report+exit`
(the target's `done` to the donor's exit: REPORT, REBOOT, the donor's exit). The first is
split further by `donor_startup_s`: `deploy send` spawned against a loopback listener
until it connects (the same command line; no target, so no handshake), beside its anchor,
a bare `python -c` that connects. Both processes run from bytecode compiled once into a
cache outside the checkout, as an installed spk-visor does (the image and the shim
compile it): with PYTHONDONTWRITEBYTECODE, set in some dev shells, every donor start
would compile spk_visor from source again. dd hashes nothing and writes
once; the deploy must write, sync and read back. The bundle and the raw image are evicted
from the page cache before every timed run. Deploy and dd take turns at going first;
medians; the load average is printed; an absurd ratio fails (bench/figures.py).

--direct-io attaches the target loop device with `losetup --direct-io=on`
(bench/loop_mode.py): dd, the deploy and the I/O floor then read and write the disk under
the loop file, not its page cache; `loop_direct_io` says which mode ran, and
`host_disk_mib` what that disk read and wrote during each deploy, dd and replay.

Sizes: --mib or SPK_VISOR_BENCH_DEPLOY_MIB (1024) for both the channel stream and the
image; rounds: SPK_VISOR_BENCH_ROUNDS (3) for the channel, --rounds or
SPK_VISOR_BENCH_DEPLOY_ROUNDS (1) for the whole deploy. MB/s are 10^6 bytes per second of
raw image. Exit 0 unless a part fails to run; the goals are reported as goal_met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import deploy_channel, deploy_iso, figures, floors, loop_mode, ota_slots
from spk_visor.deploy import channel
from spk_visor.ota import build
from tests.support.loopdisk import LoopDisk
from tests.support.ota_pki import Pki, tiny_tree
from tests.support.zstd_image import evict

MIB = 1 << 20
SIZE_ENV = "SPK_VISOR_BENCH_DEPLOY_MIB"
ROUNDS_ENV = "SPK_VISOR_BENCH_DEPLOY_ROUNDS"
GOAL_RATIO = 0.5  # up to 1 GiB: the fixed steps (mkfs, GRUB) weigh more
GOAL_RATIO_LARGE = 0.7  # 4 GiB
NAMEPLATE = "42"
ROOT_A_INDEX = 3  # bios_grub, esp, root-a, root-b, data (spk_visor.deploy.install)
TIMEOUT = 900.0
_REPO = Path(__file__).resolve().parents[1]


# The run's bytecode cache (in its work folder, removed with it): see _bytecode.
_pycache: Path | None = None


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(_REPO)}
    if _pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # see the module docstring (and bench/cli.py)
        env["PYTHONPYCACHEPREFIX"] = str(_pycache)
    return env


@contextlib.contextmanager
def _bytecode(work: Path) -> Iterator[None]:
    """spk_visor's bytecode, once, into `work`: every process of the run uses it, and
    none after it (the folder goes with the run)."""
    global _pycache  # noqa: PLW0603 (one run at a time; _env reads it)
    _pycache = work / "pycache"
    try:
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(_REPO / "spk_visor")],
            env=_env(),
            check=True,
            timeout=300,
            capture_output=True,
        )
        yield
    finally:
        _pycache = None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Receiver events that end a part of the session before the disk phases begin.
_MARKS = {"connected": "hello+plan", "plan_ok": "plan_ok"}


class _Receiver:
    """`spk-visor deploy receive --json --once` on 127.0.0.1; its events, time-stamped."""

    def __init__(self, work: Path, root: Path, port: int) -> None:
        self.mnt = work / "mnt"
        self.rebooted = work / "rebooted"
        self.rebooted.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "spk_visor",
            "deploy",
            "receive",
            "--json",
            "--allow-loop",
            "--once",
            "--no-announce",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--trust-root",
            str(root),
            "--mountpoint",
            str(self.mnt),
            "--nameplate",
            NAMEPLATE,
            "--reboot-cmd",
            f"touch {self.rebooted}",
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=_REPO
        )
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.events.append((time.perf_counter(), doc))
                self.cond.notify_all()

    def code(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for _, doc in self.events:
                    if doc.get("event") == "code":
                        return str(doc["code"])
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"receiver showed no code: {self._stderr()}")
                self.cond.wait(min(left, 0.5))

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def threads(self) -> dict[str, dict[str, float]]:
        """The image stream's thread clocks, from the receiver's file_ok event."""
        with self.cond:
            for _, doc in self.events:
                if doc.get("event") == "file_ok" and "threads" in doc:
                    return dict(doc["threads"])
        raise RuntimeError("the receiver reported no thread clocks for the image")

    def phases(self, start: float, end: float) -> dict[str, float]:
        """Seconds from each mark to the next one (the last one up to `end`): the phase
        events, and the session's `connected` (handshake done) and `plan_ok`."""
        with self.cond:
            marks = [
                (t, _MARKS.get(str(d.get("event")), str(d.get("phase"))))
                for t, d in self.events
                if d.get("event") in (*_MARKS, "phase")
            ]
        out: dict[str, float] = {}
        prev_t, prev = start, "start-up+handshake"
        for t, name in marks:
            out[prev] = round(out.get(prev, 0.0) + t - prev_t, 2)
            # After `done`: the REPORT, the REBOOT and the donor's exit.
            prev_t, prev = t, "report+exit" if name == "done" else name
        out[prev] = round(out.get(prev, 0.0) + end - prev_t, 2)
        return out

    def stop(self) -> None:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        subprocess.run(
            ["umount", "-l", str(self.mnt)], capture_output=True, timeout=30, check=False
        )


class _Busy(RuntimeError):
    """The target's wipe found the disk opened exclusively by someone else."""


_Once = tuple[
    float, dict[str, Any], dict[str, float], tuple[float, float], dict[str, dict[str, float]]
]


def _deploy_once(work: Path, bundle: Path, root: Path, disk: LoopDisk) -> _Once:
    """(wall seconds donor start -> exit, the donor's result doc, receiver phase seconds,
    CPU seconds of the donor and of the receiver, each with the tools it ran, and the
    receiver's thread clocks of the image stream)."""
    port = _free_port()
    receiver = _Receiver(work, root, port)
    try:
        code = receiver.code()
        evict(bundle)  # the same eviction as bench.ota_slots
        argv = _send_argv(bundle, port, disk.serial, code)
        t0, c0 = time.perf_counter(), _children_cpu()
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=_env(),
            cwd=_REPO,
            check=False,
        )
        elapsed = time.perf_counter() - t0
        c1 = _children_cpu()  # the donor is reaped, the receiver not yet
        docs = json.loads(done.stdout) if done.stdout.strip().startswith("[") else []
        if docs and "Device or resource busy" in str(docs[0].get("message")):
            raise _Busy(str(docs[0]["message"]))
        if done.returncode != 0 or not docs or not docs[0].get("ok"):
            raise RuntimeError(f"deploy failed ({done.returncode}): {docs} {done.stderr[-2000:]}")
        receiver.stop()
        if not receiver.rebooted.exists():
            raise RuntimeError("the receiver did not run its reboot command")
        cpu = (round(c1 - c0, 2), round(_children_cpu() - c1, 2))
        return elapsed, docs[0], receiver.phases(t0, t0 + elapsed), cpu, receiver.threads()
    finally:
        if receiver.proc.poll() is None:
            receiver.proc.kill()
        receiver.stop()


def _send_argv(bundle: Path, port: int, serial: str, code: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "spk_visor",
        "deploy",
        "send",
        "--json",
        "--bundle",
        str(bundle),
        "--target",
        f"127.0.0.1:{port}",
        "--disk",
        serial,
        "--confirm-wipe",
        serial,
        code,
    ]


def _until_connect(argv_for: Any) -> float:
    """Seconds from spawning argv_for(port) to its connection to a loopback listener."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = int(listener.getsockname()[1])
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv_for(port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(),
            cwd=_REPO,
        )
        try:
            conn, _ = listener.accept()
            elapsed = time.perf_counter() - t0
            conn.close()
        finally:
            proc.wait(timeout=TIMEOUT)
    return elapsed


def donor_startup(bundle: Path, serial: str, rounds: int = 5) -> dict[str, object]:
    """`deploy send` from spawn to connect (the bundle evicted first, as in a deploy),
    against a bare interpreter that connects; alternated, medians."""

    def send() -> float:
        evict(bundle)
        return _until_connect(lambda port: _send_argv(bundle, port, serial, f"{NAMEPLATE}-K7QX9"))

    def bare() -> float:
        return _until_connect(
            lambda port: [
                sys.executable,
                "-c",
                f"import socket; socket.create_connection(('127.0.0.1', {port})).close()",
            ]
        )

    bare_s, send_s = figures.alternate(rounds, bare, send)
    figures.ratio(bare_s, send_s, "donor start-up vs a bare interpreter")  # absurd: fails
    return {
        "donor_startup_s": round(statistics.median(send_s), 3),
        "donor_startup_runs_s": [round(t, 3) for t in send_s],
        "bare_python_connect_s": round(statistics.median(bare_s), 3),
    }


def _release(work: Path, size_mib: int) -> tuple[Path, Path, Path, float, float]:
    """(raw image, bundle, trust root, image build s, bundle build s)."""
    t0 = time.perf_counter()
    raw = ota_slots.build_image(work, size_mib)
    image_s = time.perf_counter() - t0
    pki = Pki()
    root = work / "root.json"
    root.write_bytes(pki.root_env().to_bytes())
    t0 = time.perf_counter()
    result = build.build(
        out=work / "release.spkb",
        version="1.0.0",
        counter=1,
        keys=pki.release,
        daemon_tree=tiny_tree(work / "tree", "1.0.0"),
        base_image=raw,
    )
    bundle_s = time.perf_counter() - t0
    # Written back now, not during the first timed run: the host filesystem's journal
    # would make that run's first fsyncs (the target's wipe, sfdisk, mkfs) wait for
    # 1.5 GB of someone else's dirty pages.
    for path in (raw, result.bundle):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return raw, result.bundle, root, image_s, bundle_s


def run_deploy(direct_io: bool = False) -> dict[str, object]:
    """The whole-deploy figures (or {"skipped": reason})."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (loop devices, partitioning, mount)"}
    for tool in ("losetup", "sfdisk", "mkfs.ext4", "mkfs.vfat", "grub-install", "dd"):
        if shutil.which(tool) is None:
            return {"skipped": f"{tool} not installed (scripts/install-sysdeps)"}
    size_mib = int(os.environ.get(SIZE_ENV, "1024"))
    rounds = int(os.environ.get(ROUNDS_ENV, "1"))
    with tempfile.TemporaryDirectory(prefix="spk-bench-deploy-") as tmp, _bytecode(Path(tmp)):
        work = Path(tmp)
        if direct_io:
            loop_mode.probe(work)
        raw, bundle, root, image_s, bundle_s = _release(work, size_mib)
        raw_size = raw.stat().st_size
        # 4 GiB: the ab layout needs ESP + two slots of the image + a data partition.
        disk = LoopDisk(work, f"{max(4096, 3 * size_mib + 1024)}M", direct_io=direct_io)
        try:
            mode = loop_mode.figures(disk.dev)
            host = loop_mode.HostDisk.under(work)
            deploy_s: list[float] = []
            donor_s: list[float] = []
            dd_s: list[float] = []
            phases: list[dict[str, float]] = []
            retries = 0

            deploy_cpu: list[float] = []
            split_cpu: list[tuple[float, float]] = []
            dd_cpu: list[float] = []
            clocks: list[dict[str, dict[str, float]]] = []
            # The whole machine's busy share during each run (kernel threads included: the
            # loop device's worker does the disk's writes and reads), receiver start-up
            # included for the deploy: near 1.0 means both cores were busy throughout.
            busy: dict[str, list[float]] = {"deploy": [], "dd": []}

            def machine_busy(kind: str, run: Callable[[], float]) -> float:
                m0, t0 = figures.machine_cpu_s(), time.perf_counter()
                result = run()
                share = (figures.machine_cpu_s() - m0) / (
                    (time.perf_counter() - t0) * (os.cpu_count() or 1)
                )
                busy[kind].append(round(share, 2))
                return result

            def deploy() -> float:
                return host.around("deploy", lambda: machine_busy("deploy", deploy_round))

            # The floors (bench/floors.py): the image writer's device I/O for this image
            # replayed from memory onto slot A beside dd in every round (the store copy's
            # writes of the blob are not in it), and the stages' CPU after the rounds.
            raw_mem = floors.load(raw)
            io_plan = floors.plan(raw_mem, raw_size)
            io_floor: list[float] = []
            io_cpu: list[float] = []

            def replay() -> None:
                wall, machine_cpu = host.around(
                    "io_floor",
                    lambda: floors.machine_replay(disk.part(ROOT_A_INDEX), raw_mem, io_plan),
                )
                io_floor.append(wall)
                io_cpu.append(machine_cpu)

            def dd() -> float:
                replay_first = len(dd_cpu) % 2 == 1  # the replay takes turns with dd
                if replay_first:
                    replay()
                t = host.around("dd", lambda: machine_busy("dd", dd_round))
                if not replay_first:
                    replay()
                return t

            def deploy_round() -> float:
                nonlocal retries
                c0 = _children_cpu()
                try:
                    wall, doc, phase, split, threads = _deploy_once(work, bundle, root, disk)
                except _Busy:
                    # Another receiver (a concurrent test run) probed our loop device with
                    # `wipefs -n`, which opens it O_EXCL: our wipe's own O_EXCL open lost.
                    retries += 1
                    time.sleep(2)
                    wall, doc, phase, split, threads = _deploy_once(work, bundle, root, disk)
                donor_s.append(float(doc["seconds"]))
                phases.append(phase)
                split_cpu.append(split)
                clocks.append(threads)
                deploy_cpu.append(_children_cpu() - c0)
                return wall

            def dd_round() -> float:
                # The partition the deploy made holds slot A: dd the same bytes there.
                c0 = _children_cpu()
                t = ota_slots.dd(raw, disk.part(ROOT_A_INDEX), ["oflag=direct", "conv=fsync"])
                dd_cpu.append(_children_cpu() - c0)
                return t

            figures.print_load("before")
            startup = donor_startup(bundle, disk.serial)
            # The deploy goes first in round 0: dd needs the partition it makes.
            deploy_s, dd_s = figures.alternate(rounds, deploy, dd)
            figures.print_load("after")
            sha_mbps = ota_slots.sha256_mbps()
            # The blob the bundle carries (build's own encoder, same bytes), for the floor.
            _spec, blob = build.encode_image(raw, work)
            cpu_floor = floors.cpu_floor(raw_mem, raw_size, blob.path, record=channel.CHUNK)
            load = os.getloadavg()[0]
        finally:
            disk.detach()
        med_deploy = statistics.median(deploy_s)
        med_dd = statistics.median(dd_s)
        ratio = figures.ratio(dd_s, deploy_s, "deploy vs dd")
        goal = GOAL_RATIO if size_mib <= 1024 else GOAL_RATIO_LARGE
        goal_vs_floors = floors.verdict(
            goal=goal,
            measured_ratio=ratio,
            anchor_s=med_dd,
            subject_s=med_deploy,
            io_floor_s=statistics.median(io_floor),
            cpu_floor_s=cpu_floor.floor_s,
            shared_s=floors.shared_floor_s(
                cpu_floor.sum_s, statistics.median(io_cpu), os.cpu_count() or 1
            ),
        )
        return {
            "image_mib": size_mib,
            **mode,
            "image_build_s": round(image_s, 1),
            "bundle_build_s": round(bundle_s, 1),
            "bundle_mib": round(bundle.stat().st_size / MIB, 1),
            "compression_ratio": round(raw_size / bundle.stat().st_size, 2),
            "rounds": rounds,
            "retries_after_busy_wipe": retries,
            "deploy_s": [round(t, 2) for t in deploy_s],
            "donor_session_s": [round(t, 2) for t in donor_s],
            "dd_s": [round(t, 2) for t in dd_s],
            "dd_target": "slot A partition (root-a) of the same loop device",
            # CPU seconds of donor + receiver (and the tools they ran), and of dd: what
            # the deploy costs whatever share of the machine it was given.
            "deploy_cpu_s": [round(t, 2) for t in deploy_cpu],
            "donor_cpu_s": [d for d, _r in split_cpu],
            "receiver_cpu_s": [r for _d, r in split_cpu],
            "dd_cpu_s": [round(t, 2) for t in dd_cpu],
            "machine_busy_share": busy,
            "deploy_mbps": round(raw_size / med_deploy / 1e6, 1),
            "dd_mbps": round(raw_size / med_dd / 1e6, 1),
            "ratio": round(ratio, 3),
            "goal_ratio": goal,
            "goal_met": ratio >= goal,
            "image_bytes": ota_slots.byte_figures(clocks),
            "phases_s": phases,
            **startup,
            "threads": ota_slots.thread_figures(clocks),
            # Each round's own clocks: the first round runs on new host blocks and is
            # slower, which a median over two rounds hides.
            "threads_by_round": clocks,
            "sha256_mbps": round(sha_mbps, 1),
            "io_floor_s": [round(t, 2) for t in io_floor],
            "io_floor_machine_cpu_s": [round(t, 2) for t in io_cpu],
            **host.figures(),
            "cpu_floor": cpu_floor.figures(),
            "goal_vs_floors": goal_vs_floors,
            "load_average_1min_at_end": round(load, 2),
            "load_average": figures.load_average(),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy", description=__doc__)
    parser.add_argument("--skip-iso", action="store_true", help="Skip the ISO build.")
    parser.add_argument("--skip-deploy", action="store_true", help="Skip the whole deploy.")
    parser.add_argument("--skip-channel", action="store_true", help="Skip the channel part.")
    parser.add_argument("--mib", type=int, help=f"Image size in MiB (else ${SIZE_ENV}, 1024).")
    parser.add_argument("--rounds", type=int, help=f"Deploy rounds (else ${ROUNDS_ENV}, 1).")
    loop_mode.add_option(parser)
    args = parser.parse_args(argv)
    if args.direct_io and args.skip_deploy:
        parser.error("--direct-io sets up the deploy's target disk: drop --skip-deploy or it")
    if args.mib is not None:
        os.environ[SIZE_ENV] = str(args.mib)
    if args.rounds is not None:
        os.environ[ROUNDS_ENV] = str(args.rounds)
    result: dict[str, object] = {}
    if args.skip_channel:
        result["channel"] = {"skipped": "--skip-channel"}
        print("channel: skipped: --skip-channel", flush=True)
    else:
        result["channel"] = ch = deploy_channel.run()
        print(
            f"channel: AES-GCM {ch['aes_gcm_mb_s']} MB/s vs raw TCP {ch['raw_tcp_mb_s']} "
            f"MB/s = {ch['ratio']}x (goal {ch['goal_ratio']}x); ChaCha20 "
            f"{ch['chacha20_mb_s']} MB/s = {ch['chacha20_ratio']}x",
            flush=True,
        )
    dep: dict[str, object] = {"skipped": "--skip-deploy"}
    if not args.skip_deploy:
        with loop_mode.refusal_exits():
            dep = run_deploy(args.direct_io)
    result["deploy"] = dep
    if "skipped" in dep:
        print(f"deploy: skipped: {dep['skipped']}", flush=True)
    else:
        print(
            f"deploy: {dep['image_mib']} MiB image in {dep['deploy_s']} s = {dep['deploy_mbps']}"
            f" MB/s vs dd {dep['dd_s']} s = {dep['dd_mbps']} MB/s = {dep['ratio']}x "
            f"(goal {dep['goal_ratio']}x), loop direct I/O {dep['loop_direct_io']}",
            flush=True,
        )
        print(f"deploy vs floors: {dep['goal_vs_floors']}", flush=True)
        print(
            f"donor start-up to connect: {dep['donor_startup_s']} s (bare python "
            f"{dep['bare_python_connect_s']} s); phases (s):",
            flush=True,
        )
        phases = dep["phases_s"]
        assert isinstance(phases, list)
        for phase in phases:
            print("  " + ", ".join(f"{k} {v}" for k, v in phase.items()), flush=True)
    iso = {"skipped": "--skip-iso"} if args.skip_iso else deploy_iso.run()
    result["iso"] = iso
    if "skipped" in iso:
        print(f"iso: skipped: {iso['skipped']}", flush=True)
    else:
        print(f"iso: {iso['iso_mib']} MiB, built in {iso['build_s']} s", flush=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
