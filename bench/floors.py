"""What this machine allows a bench's subject: its I/O floor and its CPU floor, measured
in the same run as the subject and its anchor, and the best ratio they leave.

- **I/O floor** (`replay`): the device I/O the image writer (spk_visor/install/image.py)
  does for one image, replayed from the raw image already in memory, with no decode and
  no hashing: the same CHUNK windows after the held-back head, the same runs of zero
  blocks zeroed with BLKZEROOUT and the rest written O_DIRECT (the writer's own
  blockdev.zero_runs / zeroout / pwrite_all, the runs found before the clock starts),
  every window read back (blockdev.pread_into) on its own thread one window behind the
  writes, an fdatasync every SYNC_BYTES of read-back bytes on a third thread and a last
  one after the body, then the tail and the head written through the page cache, fsync,
  cache drop and the head read back (write_ends + check_ends). Nothing is compared: the
  memcmp is CPU and counted in the CPU floor.
- **CPU floor** (`cpu_floor`): single-thread CPU seconds of each stage the design
  requires (zstd decode of the blob, sha256 of the raw image and of the blob, memcmp of
  the raw image against its read-back; for deploy also AES-256-GCM seal + open of the
  blob in the channel's records and raw TCP loopback send + receive of the blob), and
  from them the least wall time on os.cpu_count() cores: max(sum / cores, the largest
  single stage), because each stage is one sequential stream on one thread. It leaves
  out kernel work the process does not see as its own (the loop device's worker copying
  pages, its flushes), so the true floor is higher.

`ceiling(anchor_s, io_s, cpu_s)` = anchor_s / max(io_s, cpu_s) is the best ratio against
the anchor that those floors allow: a goal above it cannot be reached on this machine by
any change to the subject's code; a goal below it can, as far as these floors tell.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import figures
from spk_visor.install import blockdev
from spk_visor.install import image as image_writer

MIB = 1 << 20
GIB = 1 << 30
KERNEL_NOTE = (
    "CPU floor = max(sum of single-thread stage CPU / cores, the largest stage); kernel "
    "work outside the process (the loop device worker's copies and flushes) is not in "
    "it, so the true floor is higher"
)


@dataclass(frozen=True)
class Window:
    """One window of the body as the writer sends it to the device: (offset within the
    window, length, all zero) runs of ZERO_BLOCK blocks."""

    offset: int
    length: int
    runs: tuple[tuple[int, int, bool], ...]


@dataclass(frozen=True)
class Plan:
    """The writer's device I/O for one raw image: head held back, body windows, tail."""

    size: int
    head_len: int
    body_end: int
    windows: tuple[Window, ...]

    @property
    def zeroed_bytes(self) -> int:
        return sum(n for w in self.windows for _at, n, zero in w.runs if zero)


def load(raw: Path) -> blockdev.Buffer:
    """The raw image in page-aligned anonymous memory (O_DIRECT writes take it as is).
    Not a mapping of the file: a mapped file's pages cannot be evicted, and the anchors
    (dd) must read the raw file from the disk."""
    size = raw.stat().st_size
    buf = blockdev.Buffer(max(size, blockdev.ALIGN))
    fd = os.open(raw, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if blockdev.pread_into(fd, buf.view[:size], 0) != size:
            raise OSError(f"{raw} got shorter while it was read")
    finally:
        os.close(fd)
    return buf


def _at(buf: blockdev.Buffer, offset: int) -> blockdev.Buffer:
    """A Buffer view of `buf` from `offset` (what zero_runs reads through .addr)."""
    part = blockdev.Buffer.__new__(blockdev.Buffer)
    part.mem = buf.mem
    part.view = buf.view[offset:]
    part.addr = buf.addr + offset
    return part


def plan(buf: blockdev.Buffer, size: int, chunk: int = image_writer.CHUNK) -> Plan:
    """The windows and zero runs ImageWriter.stream and _write_window make of `size`
    raw bytes (the same HEAD, ALIGN and ZERO_BLOCK), found with blockdev.zero_runs."""
    head_len = min(image_writer.HEAD, size)
    body_end = head_len + (size - head_len) // blockdev.ALIGN * blockdev.ALIGN
    windows = []
    for offset in range(head_len, body_end, chunk):
        n = min(chunk, body_end - offset)
        runs = blockdev.zero_runs(_at(buf, offset), n, image_writer.ZERO_BLOCK)
        windows.append(Window(offset, n, tuple(runs)))
    return Plan(size, head_len, body_end, tuple(windows))


def replay(
    device: str,
    buf: blockdev.Buffer,
    image_plan: Plan,
    *,
    sync_bytes: int = image_writer.SYNC_BYTES,
    in_flight: int = 2,
) -> float:
    """Seconds to do `image_plan`'s device I/O on `device` (see the module docstring).
    `in_flight`: windows written but not yet read back, the one being read included
    (2: the reads run one window behind the writes)."""
    fd, direct = blockdev.open_for_writing(device)
    zeroout = stat.S_ISBLK(os.fstat(fd).st_mode)
    check = blockdev.Buffer(image_writer.CHUNK)
    room = threading.Semaphore(in_flight)
    to_check: list[Window | None] = []
    ready = threading.Condition()
    sync = threading.Condition()
    state = {"checked": 0, "durable": 0, "stop": False}
    errors: list[BaseException] = []

    def checker() -> None:
        try:
            while True:
                with ready:
                    while not to_check:
                        ready.wait()
                    w = to_check.pop(0)
                if w is None:
                    return
                if not direct:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, w.offset, w.length, os.POSIX_FADV_DONTNEED)
                if blockdev.pread_into(fd, check.view[: w.length], w.offset) != w.length:
                    raise OSError(f"short read-back at {w.offset}")
                with sync:
                    state["checked"] += w.length
                    if state["checked"] - state["durable"] >= sync_bytes:
                        sync.notify()
                room.release()
        except BaseException as e:
            errors.append(e)
            room.release()

    def syncer() -> None:
        try:
            while True:
                with sync:
                    while not state["stop"] and state["checked"] - state["durable"] < sync_bytes:
                        sync.wait()
                    upto, last = state["checked"], state["stop"]
                if upto > state["durable"]:
                    os.fdatasync(fd)
                    with sync:
                        state["durable"] = upto
                if last:
                    return
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=f, daemon=True) for f in (checker, syncer)]
    try:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        try:
            for w in image_plan.windows:
                room.acquire()
                if errors:
                    break
                for at, n, zero in w.runs:
                    if zero and zeroout:
                        try:
                            blockdev.zeroout(fd, w.offset + at, n)
                            continue
                        except OSError as e:
                            if e.errno not in blockdev.ZEROOUT_UNSUPPORTED:
                                raise
                            zeroout = False
                    start = w.offset + at
                    blockdev.pwrite_all(fd, buf.view[start : start + n], start)
                with ready:
                    to_check.append(w)
                    ready.notify()
        finally:
            with ready:
                to_check.append(None)
                ready.notify()
            threads[0].join()
            with sync:
                state["stop"] = True
                sync.notify()
            threads[1].join()
        if errors:
            raise errors[0]
        # write_ends + check_ends
        os.fsync(fd)
        if direct:
            blockdev.set_direct(fd, False)
        tail = bytes(buf.view[image_plan.body_end : image_plan.size])
        blockdev.pwrite_all(fd, tail, image_plan.body_end)
        blockdev.pwrite_all(fd, bytes(buf.view[: image_plan.head_len]), 0)
        os.fsync(fd)
        blockdev.drop_cache(fd)
        for at, n in ((0, image_plan.head_len), (image_plan.body_end, len(tail))):
            back = bytearray(n)
            if blockdev.pread_into(fd, memoryview(back), at) != n:
                raise OSError(f"short read-back of the ends at {at}")
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def machine_replay(device: str, buf: blockdev.Buffer, image_plan: Plan) -> tuple[float, float]:
    """`replay`'s seconds, and the whole machine's busy CPU seconds during it (/proc/stat:
    the replay's own system calls and the loop device worker's copies and flushes, plus
    whatever else ran): the CPU the I/O itself takes from the cores the stages share."""
    m0 = figures.machine_cpu_s()
    wall = replay(device, buf, image_plan)
    return wall, figures.machine_cpu_s() - m0


# -- the CPU floor


def _thread_cpu(work: Callable[[], None]) -> float:
    c0 = time.thread_time()
    work()
    return time.thread_time() - c0


def zstd_decode_cpu(blob: bytes, raw_size: int) -> float:
    """CPU seconds of one thread decoding `blob` into a reused CHUNK window."""
    out = blockdev.Buffer(image_writer.CHUNK)
    got = 0

    def work() -> None:
        nonlocal got
        dctx = zstandard.ZstdDecompressor(max_window_size=image_writer.MAX_WINDOW)
        reader = dctx.stream_reader(
            io.BytesIO(blob), read_size=image_writer.READ_SIZE, read_across_frames=True
        )
        while n := reader.readinto(out.view):
            got += n

    cpu = _thread_cpu(work)
    if got != raw_size:
        raise ValueError(f"the blob decodes to {got} bytes, not {raw_size}")
    return cpu


def sha256_cpu(data: memoryview) -> float:
    def work() -> None:
        digest = hashlib.sha256()
        for at in range(0, len(data), image_writer.CHUNK):
            digest.update(data[at : at + image_writer.CHUNK])
        digest.digest()

    return _thread_cpu(work)


def memcmp_cpu(buf: blockdev.Buffer, size: int) -> float:
    """CPU seconds of comparing every window of the raw image with a copy of it (what the
    checker does with each read-back); the copies are not counted."""
    other = blockdev.Buffer(image_writer.CHUNK)
    cpu = 0.0
    for at in range(0, size, image_writer.CHUNK):
        n = min(image_writer.CHUNK, size - at)
        other.view[:n] = buf.view[at : at + n]
        c0 = time.thread_time()
        equal = blockdev.same(_at(buf, at), other, n)
        cpu += time.thread_time() - c0
        if not equal:
            raise AssertionError("a copy differs from its source")
    return cpu


def aead_cpu(blob: memoryview, record: int) -> tuple[float, float]:
    """CPU seconds of sealing the blob with AES-256-GCM in `record`-byte records (the
    donor) and of opening it again (the target), each on one thread."""
    aead = AESGCM(os.urandom(32))
    sealed = memoryview(bytearray(record + 16))
    opened = memoryview(bytearray(record))
    seal = open_ = 0.0
    for i, at in enumerate(range(0, len(blob), record)):
        piece = blob[at : at + record]
        nonce = i.to_bytes(12, "big")
        n = len(piece) + 16
        c0 = time.thread_time()
        aead.encrypt_into(nonce, piece, b"", sealed[:n])
        c1 = time.thread_time()
        aead.decrypt_into(nonce, sealed[:n], b"", opened[: len(piece)])
        seal, open_ = seal + c1 - c0, open_ + time.thread_time() - c1
    return seal, open_


def tcp_cpu(blob: memoryview, record: int) -> tuple[float, float]:
    """CPU seconds (kernel time included) of sending the blob over TCP loopback in
    `record`-byte sendalls, and of receiving it with recv_into, each on its own thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    got = [0, 0.0]

    def receive() -> None:
        conn, _ = listener.accept()
        c0 = time.thread_time()
        sink = memoryview(bytearray(record))
        while n := conn.recv_into(sink):
            got[0] += n
        got[1] = time.thread_time() - c0
        conn.close()

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    sock = socket.create_connection(listener.getsockname()[:2])
    try:
        c0 = time.thread_time()
        for at in range(0, len(blob), record):
            sock.sendall(blob[at : at + record])
        sock.shutdown(socket.SHUT_WR)
        sent = time.thread_time() - c0
    finally:
        sock.close()
        t.join(120)
        listener.close()
    if got[0] != len(blob):
        raise OSError(f"the receiver got {got[0]} bytes, not {len(blob)}")
    return sent, float(got[1])


def channel_stages(data: memoryview, record: int, scale: float = 1.0) -> dict[str, float]:
    """The channel's single-thread stages for `data` (times `scale`: a sample standing in
    for a larger stream): AES-256-GCM seal and open, TCP loopback send and receive."""
    seal, open_ = aead_cpu(data, record)
    send, recv = tcp_cpu(data, record)
    return {
        "aes256gcm_seal": seal * scale,
        "aes256gcm_open": open_ * scale,
        "tcp_send": send * scale,
        "tcp_recv": recv * scale,
    }


def bound_s(stages_cpu_s: dict[str, float], cores: int) -> float:
    """The least wall time these single-thread stages can take on `cores` cores: all
    cores busy all the time (sum / cores), and no stage split across cores (the largest)."""
    if cores < 1:
        raise ValueError("cores must be at least 1")
    if not stages_cpu_s:
        return 0.0
    return max(sum(stages_cpu_s.values()) / cores, *stages_cpu_s.values())


@dataclass(frozen=True)
class CpuFloor:
    """Single-thread CPU seconds per stage for `size` raw bytes, on `cores` cores."""

    stages: dict[str, float]
    size: int
    cores: int

    @property
    def sum_s(self) -> float:
        return sum(self.stages.values())

    @property
    def floor_s(self) -> float:
        return bound_s(self.stages, self.cores)

    def figures(self) -> dict[str, object]:
        gib = self.size / GIB
        return {
            "cpu_s": {k: round(v, 3) for k, v in self.stages.items()},
            "cpu_s_per_gib": {k: round(v / gib, 3) for k, v in self.stages.items()},
            "cores": self.cores,
            "cpu_sum_s": round(self.sum_s, 3),
            "cpu_floor_s": round(self.floor_s, 3),
            "note": KERNEL_NOTE,
        }


def cpu_floor(
    buf: blockdev.Buffer, size: int, blob: Path, *, record: int | None = None
) -> CpuFloor:
    """Single-thread CPU seconds of each stage for this image and blob (with `record`, the
    channel's record size: deploy's AES-256-GCM and TCP stages too)."""
    data = blob.read_bytes()
    raw = buf.view[:size]
    stages = {
        "zstd_decode": zstd_decode_cpu(data, size),
        "sha256_raw": sha256_cpu(raw),
        "sha256_blob": sha256_cpu(memoryview(data)),
        "memcmp_raw": memcmp_cpu(buf, size),
    }
    if record is not None:
        stages.update(channel_stages(memoryview(data), record))
    return CpuFloor(stages, size, os.cpu_count() or 1)


def ceiling(anchor_s: float, io_floor_s: float, cpu_floor_s: float) -> float:
    """The best subject ratio (anchor time / subject time) the floors allow."""
    floor = max(io_floor_s, cpu_floor_s)
    if floor <= 0 or anchor_s <= 0:
        raise ValueError(f"no ceiling from anchor {anchor_s} s and floor {floor} s")
    return anchor_s / floor


def shared_floor_s(cpu_sum_s: float, io_machine_cpu_s: float, cores: int) -> float:
    """The least wall time when the stages' CPU and the CPU the I/O costs the machine
    (kernel threads included, measured during the replay) share the same cores."""
    if cores < 1:
        raise ValueError("cores must be at least 1")
    return (cpu_sum_s + io_machine_cpu_s) / cores


def verdict(
    *,
    goal: float,
    measured_ratio: float,
    anchor_s: float,
    subject_s: float,
    io_floor_s: float,
    cpu_floor_s: float,
    shared_s: float | None = None,
) -> dict[str, object]:
    """Per goal: the measured ratio, the ceiling the floors allow, whether the goal is
    below it, and how far the subject is above its floor (1.0: on it). With `shared_s`
    (shared_floor_s), the same once more with the I/O's own CPU on the shared cores."""
    best = ceiling(anchor_s, io_floor_s, cpu_floor_s)
    floor = max(io_floor_s, cpu_floor_s)
    shared: dict[str, object] = {}
    if shared_s is not None:
        worst = max(floor, shared_s)
        shared = {
            "shared_cores_floor_s": round(shared_s, 3),
            "ceiling_ratio_shared_cores": round(anchor_s / worst, 3),
            "goal_below_ceiling_shared_cores": goal <= anchor_s / worst,
        }
    return {
        "goal_ratio": goal,
        "measured_ratio": round(measured_ratio, 3),
        "ceiling_ratio": round(best, 3),
        "goal_below_ceiling": goal <= best,
        "bound_by": "io" if io_floor_s >= cpu_floor_s else "cpu",
        "io_floor_s": round(io_floor_s, 3),
        "cpu_floor_s": round(cpu_floor_s, 3),
        "subject_over_floor": round(subject_s / floor, 3),
        **shared,
    }
