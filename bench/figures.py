"""What every bench needs to report figures honestly on a shared machine.

- the load average, printed at the start and the end: a figure means little without it;
- anchor and subject alternated (anchor first in even rounds, subject first in odd
  rounds), so a drift in the machine's speed hits both alike;
- a figure that cannot be true fails the bench instead of being reported: a zero time,
  or a ratio above ABSURD_RATIO (a subject that does more work than its anchor cannot be
  three times faster; such a figure measured nothing, as bench/ota_slots.py's rounds 2 and
  3 once did by finding the image already staged).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

ABSURD_RATIO = 3.0


class AbsurdFigure(SystemExit):
    """The bench measured nothing it claims: exit non-zero with the reason."""

    def __init__(self, what: str) -> None:
        super().__init__(f"absurd figure, not reported: {what}")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: every state
    but idle and iowait). Unlike a process's own CPU it includes kernel threads, such as
    the loop device's worker that does a loop disk's writes and reads: over a run,
    delta / (wall * cpu_count) says how much of the machine the run kept busy."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    # guest time is already inside user; steal is time another VM had the CPU
    busy = user + nice + system + irq + softirq
    return busy / os.sysconf("SC_CLK_TCK")


def print_load(label: str) -> None:
    print(f"{label}: {load_average()}", flush=True)


def alternate(
    rounds: int, anchor: Callable[[], float], subject: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Seconds of each run of `anchor` and `subject`, taking turns at going first."""
    a: list[float] = []
    s: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            a.append(anchor())
            s.append(subject())
        else:
            s.append(subject())
            a.append(anchor())
    return a, s


def ratio(anchor_s: list[float], subject_s: list[float], what: str) -> float:
    """median(anchor) / median(subject): how fast the subject is against its anchor.
    AbsurdFigure for a zero time or a ratio above ABSURD_RATIO."""
    for name, times in (("anchor", anchor_s), ("subject", subject_s)):
        if not times or min(times) <= 0:
            raise AbsurdFigure(f"{what}: a {name} time of zero ({times})")
    r = statistics.median(anchor_s) / statistics.median(subject_s)
    if r > ABSURD_RATIO:
        raise AbsurdFigure(f"{what}: ratio {r:.2f} > {ABSURD_RATIO} ({anchor_s} vs {subject_s})")
    return r


def check_between(value: float, low: float, high: float, what: str) -> float:
    """`value` when it lies in [low, high], the range a true figure can take; else
    AbsurdFigure (it measured something other than it claims)."""
    if not low <= value <= high:
        raise AbsurdFigure(f"{what}: {value:.3f} outside the possible {low:.3f} to {high:.3f}")
    return value
