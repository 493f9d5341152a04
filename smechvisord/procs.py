"""What the kernel says about processes: liveness, identity, CPU and memory of VMMs.

These reads use the live /proc, not SMECHVISORD_SYSROOT: the VMMs are real processes on
the running kernel, while a sysroot describes the host's hardware and boot facts. On a
node both are the same /proc; in tests the sysroot is a fixture that holds no processes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_READ = 64 * 1024


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str
    start_ticks: int  # since boot; with the pid it names one process even after pid reuse
    cpu_ticks: int  # utime + stime
    rss_bytes: int


def _read(pid: int, name: str) -> bytes | None:
    # Plain strings, not pathlib: GET /api/vms does this for every VM on every call.
    try:
        with open(f"{PROC}/{pid}/{name}", "rb") as f:
            return f.read(MAX_READ)
    except OSError:
        return None


def stat(pid: int) -> ProcStat | None:
    data = _read(pid, "stat")
    if data is None:
        return None
    raw = data.decode("ascii", "replace")
    # comm (field 2) may hold spaces and parentheses: split at the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return ProcStat(
            pid=pid,
            state=fields[0],
            start_ticks=int(fields[19]),
            cpu_ticks=int(fields[11]) + int(fields[12]),
            rss_bytes=int(fields[21]) * PAGE_SIZE,
        )
    except (IndexError, ValueError):
        return None


def cmdline(pid: int) -> list[str] | None:
    raw = _read(pid, "cmdline")
    if raw is None:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0")[:-1]]


def is_alive(pid: int, start_ticks: int | None) -> bool:
    st = stat(pid)
    if st is None or st.state in ("Z", "X"):
        return False
    return start_ticks is None or st.start_ticks == start_ticks


def pids() -> Iterator[int]:
    try:
        names = os.listdir(PROC)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def boot_uptime() -> float:
    return float((PROC / "uptime").read_text().split()[0])


class CpuSampler:
    """CPU percent per process, like top: the change in CPU time over at least
    MIN_INTERVAL seconds of wall time. The first look averages over the process lifetime,
    so a fresh listing is never empty; looks closer together reuse the last figure."""

    MIN_INTERVAL = 1.0

    def __init__(self) -> None:
        # (pid, start) -> (cpu ticks, monotonic time, percent at that time)
        self._last: dict[tuple[int, int], tuple[int, float, float]] = {}
        self._lock = threading.Lock()

    def percent(self, st: ProcStat) -> float:
        now = time.monotonic()
        key = (st.pid, st.start_ticks)
        with self._lock:
            previous = self._last.get(key)
        if previous is not None:
            ticks, when, figure = previous
            if now - when < self.MIN_INTERVAL:
                return figure
            figure = round(100.0 * (st.cpu_ticks - ticks) / CLK_TCK / (now - when), 1)
        else:
            figure = self._lifetime_percent(st)
        with self._lock:
            self._last[key] = (st.cpu_ticks, now, figure)
        return figure

    @staticmethod
    def _lifetime_percent(st: ProcStat) -> float:
        try:
            lifetime = boot_uptime() - st.start_ticks / CLK_TCK
        except (OSError, ValueError, IndexError):
            return 0.0
        if lifetime <= 0:
            return 0.0
        return round(100.0 * st.cpu_ticks / CLK_TCK / lifetime, 1)

    def retain(self, pids: set[int]) -> None:
        """Drop the samples of processes no longer in `pids` (the daemon runs for months
        while VMs come and go)."""
        with self._lock:
            for key in [k for k in self._last if k[0] not in pids]:
                del self._last[key]
