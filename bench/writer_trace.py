"""Where a base staging's time goes, window by window: bench.ota_slots run with a traced
image writer, and the trace summed up.

    sudo .venv/bin/python -m bench.writer_trace          # SPK_BENCH_SLOT_MIB, SPK_BENCH_ROUNDS

Each window gets timestamps (seconds from the stream's start) for: its buffer taken from
the free ring (`free`, the decoder waited for it), decoded and handed on (`decoded`), its
sha256 (`hash`), its write (`write`), its read-back and compare (`check`); each flush of
the syncer (`sync`) is traced too. The summary says, over the stream:

- `device_idle_s`: time no write, read-back or flush was in progress (the device had
  nothing to do: the I/O floor is not what the stream waited for then);
- `decoder_idle_s`: time the decoder (the one single-thread stage all others follow) was
  not decoding: waiting for a free window or before its first;
- per kind, the total and the median per window, split into what ran while a flush was
  in progress and what did not (on a buffered loop device a flush holds up the loop
  worker's other requests);
- the same for each device call of the stream on its own (`zero`: a BLKZEROOUT, `pwrite`:
  a data write, `pread`: a read-back; a window's write is one call per run of zero or
  data blocks), with the MiB each kind moved and its longest call.

bench.ota_slots stages under two conditions each round (the blob cold: read from the
disk; warm: in the page cache); each trace is labelled with its condition and the
summaries are printed apart, under `trace.cold` and `trace.warm` (the streams differ:
a cold stream's reads share the disk with the slot's writes).

The writer's behaviour is unchanged: the trace is a subclass that times the writer's own
methods, and a stand-in for image.py's `os` that times `fdatasync` on the syncer's
thread. bench.ota_slots' own figures are printed as usual; the trace comes after them.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from typing import Any, ClassVar

from bench import ota_slots
from spk_visor.install import blockdev
from spk_visor.install import image as image_writer

SPANS_ENV = "SPK_BENCH_TRACE_SPANS"  # a file to write every span to
# kind, window index (sync: its count; zero, pwrite, pread: the call's bytes), start, end
Span = tuple[str, int, float, float]
# The writer's and checker's device calls, each traced on its own (one window's write is
# a pwrite per data run and a BLKZEROOUT per zero run).
CALLS = {"zeroout": "zero", "pwrite_all": "pwrite", "pread_into": "pread"}


class Traced(ota_slots._Recorded):
    """The image writer with a per-window trace (`spans`), every instance kept, each with
    the condition (cold, warm) its blob was prepared for."""

    runs: ClassVar[list[Traced]] = []
    preparing: ClassVar[str] = "unknown"  # the condition of the latest ota_slots.prepare

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.t0 = time.perf_counter()
        self.spans: list[Span] = []
        self._windows: dict[int, int] = {}
        self._hashed = 0
        # bench.ota_slots prepares the blob for its condition right before each stage.
        self.condition = Traced.preparing
        Traced.runs.append(self)
        free_get = self._free.get
        digest = self.digest

        def get(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            buf = free_get(*a, **kw)
            self._span("free", len(self._windows), t)
            return buf

        class _Digest:
            def update(_self, data: Any) -> None:
                t = time.perf_counter()
                digest.update(data)
                self._span("hash", self._hashed, t)
                self._hashed += 1

            def hexdigest(_self) -> str:
                return digest.hexdigest()

        self._free.get = get  # type: ignore[method-assign]
        self.digest = _Digest()  # type: ignore[assignment]

    def _span(self, kind: str, index: int, start: float) -> None:
        self.spans.append((kind, index, start - self.t0, time.perf_counter() - self.t0))

    def _index(self, offset: int) -> int:
        return self._windows.setdefault(offset, len(self._windows))

    def _submit(self, piece: Any, write: bool) -> None:
        t = time.perf_counter()
        if write:
            self._span("decoded", self._index(piece.offset), t)
        super()._submit(piece, write)

    def _write_window(self, piece: Any) -> None:
        t = time.perf_counter()
        super()._write_window(piece)
        self._span("write", self._index(piece.offset), t)

    def _check_window(self, piece: Any) -> None:
        t = time.perf_counter()
        super()._check_window(piece)
        self._span("check", self._index(piece.offset), t)


class _TracedBlockdev:
    """image.py's `blockdev`, with each zeroout, pwrite and pread of the stream timed."""

    def __getattr__(self, name: str) -> Any:
        real = getattr(blockdev, name)
        kind = CALLS.get(name)
        if kind is None:
            return real

        def call(fd: int, data: Any, *args: Any) -> Any:
            t = time.perf_counter()
            out = real(fd, data, *args)
            writer = Traced.runs[-1] if Traced.runs else None
            if writer is not None and threading.current_thread().name.startswith("image-"):
                writer._span(kind, args[0] if kind == "zero" else len(data), t)
            return out

        return call


class _TracedOs:
    """image.py's `os`, with the syncer's fdatasync timed."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def fdatasync(fd: int) -> None:
        t = time.perf_counter()
        os.fdatasync(fd)
        writer = Traced.runs[-1] if Traced.runs else None
        if writer is not None and threading.current_thread().name == "image-sync":
            writer._span("sync", sum(1 for s in writer.spans if s[0] == "sync"), t)


def union_s(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the (start, end) spans."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def overlaps(span: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    return any(a < span[1] and span[0] < b for a, b in others)


def summary(spans: list[Span], wall: float) -> dict[str, object]:
    """One stream's trace summed up (see the module docstring)."""
    by: dict[str, list[tuple[float, float]]] = {}
    for kind, _i, a, b in spans:
        by.setdefault(kind, []).append((a, b))
    syncs = by.get("sync", [])
    device = by.get("write", []) + by.get("check", []) + syncs
    out: dict[str, object] = {
        "wall_s": round(wall, 3),
        "device_idle_s": round(wall - union_s(device), 3),
        "device_busy_s": round(union_s(device), 3),
    }
    # The decoder is busy from taking a free window to handing it on.
    free = sorted(by.get("free", []))
    decoded = sorted(by.get("decoded", []))
    decoding = [(f[1], d[0]) for f, d in zip(free, decoded, strict=False)]
    out["decoder_busy_s"] = round(union_s(decoding), 3)
    out["decoder_free_wait_s"] = round(sum(b - a for a, b in free), 3)
    for kind in ("hash", "write", "check", "sync", "zero", "pwrite", "pread"):
        spans_k = by.get(kind, [])
        during = [b - a for a, b in spans_k if kind != "sync" and overlaps((a, b), syncs)]
        apart = [b - a for a, b in spans_k if kind == "sync" or not overlaps((a, b), syncs)]
        entry: dict[str, float] = {
            "n": len(spans_k),
            "total_s": round(sum(b - a for a, b in spans_k), 3),
            "median_s": round(statistics.median(b - a for a, b in spans_k), 4) if spans_k else 0,
            "during_sync_n": len(during),
            "during_sync_median_s": round(statistics.median(during), 4) if during else 0,
            "apart_median_s": round(statistics.median(apart), 4) if apart else 0,
        }
        if kind in CALLS.values():
            sizes = [i for k, i, _a, _b in spans if k == kind]
            entry["mib"] = round(sum(sizes) / (1 << 20), 1)
            entry["max_s"] = round(max((b - a for a, b in spans_k), default=0), 4)
        out[kind] = entry
    return out


def main() -> int:
    if os.geteuid() != 0:
        print("bench.writer_trace needs root (loop devices)", file=sys.stderr)
        return 2
    real_recorded, real_os, real_prepare = ota_slots._Recorded, os, ota_slots.prepare

    def prepare(path: Any, cond: str) -> float:
        Traced.preparing = cond
        return real_prepare(path, cond)

    ota_slots._Recorded = Traced  # type: ignore[misc]
    ota_slots.prepare = prepare
    image_writer.os = _TracedOs()  # type: ignore[attr-defined,assignment]
    image_writer.blockdev = _TracedBlockdev()  # type: ignore[attr-defined,assignment]
    try:
        print(json.dumps(ota_slots.run(), indent=2))
    finally:
        ota_slots._Recorded = real_recorded  # type: ignore[misc]
        ota_slots.prepare = real_prepare
        image_writer.os = real_os  # type: ignore[attr-defined]
        image_writer.blockdev = blockdev  # type: ignore[attr-defined]
    traces: dict[str, list[dict[str, object]]] = {}
    for w in Traced.runs:
        traces.setdefault(w.condition, []).append(summary(w.spans, w.stream_s))
    if out := os.environ.get(SPANS_ENV):  # every span, for a closer look
        with open(out, "w", encoding="utf-8") as f:
            json.dump([{"condition": w.condition, "spans": w.spans} for w in Traced.runs], f)
    print(json.dumps({"trace": traces}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
