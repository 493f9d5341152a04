"""How results reach people and scripts. Only the CLI prints, through one Console whose
streams tests can swap (EXAMPLES.md B.10)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Console:
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    # Where confirmations are read from; only its TTY-ness is ours to ask (the prompt
    # itself reads sys.stdin through typer).
    inp: TextIO = field(default_factory=lambda: sys.stdin)

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def write(self, text: str) -> None:
        """Raw text, flushed at once (a followed serial log must appear as it arrives)."""
        self.out.write(text)
        self.out.flush()

    def json(self, doc: Any) -> None:
        self.out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    def json_line(self, doc: Any) -> None:
        """One document per line (JSON Lines) for streams such as `vm console --follow`."""
        self.out.write(json.dumps(doc, sort_keys=True) + "\n")
        self.out.flush()

    def prompt(self, text: str) -> str:
        """Ask on stderr, read one line from the input ('' at end of input). stdout is
        left alone, so results and --json documents stay clean."""
        self.err.write(text)
        self.err.flush()
        return self.inp.readline()

    def error(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    @property
    def err_is_tty(self) -> bool:
        return _isatty(self.err)

    @property
    def in_is_tty(self) -> bool:
        return _isatty(self.inp)


def _isatty(stream: Any) -> bool:
    # pytest and some wrappers replace the standard streams with objects that lack
    # isatty() or raise from it; neither is a terminal.
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain, aligned text table (no colours: it must survive pipes and logs)."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def mib(value: float | None) -> str:
    """Memory in the unit people read: 262144 -> '256 GiB', 512 -> '512 MiB'."""
    if value is None:
        return "-"
    if value >= 1024:
        gib = value / 1024
        return f"{gib:.0f} GiB" if gib == int(gib) or gib >= 100 else f"{gib:.1f} GiB"
    return f"{value:.0f} MiB"


def size(value: float | None) -> str:
    """Bytes in binary units: 536870912 -> '512 MiB', 1610612736 -> '1.5 GiB'."""
    if value is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while abs(value) >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    whole = value == int(value) or abs(value) >= 100
    return f"{value:.0f} {units[i]}" if whole else f"{value:.1f} {units[i]}"


def duration(seconds: float | None) -> str:
    """'3 days 4 h', '5 h 12 min', '42 s'."""
    if seconds is None:
        return "-"
    s = int(seconds)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} day{'s' if days != 1 else ''} {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def timestamp(epoch: float | None) -> str:
    """Local time, to the second: 1795815051.3 -> '2026-11-27 14:10:51'."""
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
