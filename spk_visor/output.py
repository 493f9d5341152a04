"""How results reach people and scripts. Only the CLI prints, through one Console whose
streams tests can swap (EXAMPLES.md B.10)."""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, TextIO


class Console:
    # A plain class, as are the other small types below (NamedTuples): a dataclass costs
    # ~1 ms of start-up to create, and every run creates these.
    def __init__(
        self, out: TextIO | None = None, err: TextIO | None = None, inp: TextIO | None = None
    ) -> None:
        self.out: TextIO = out if out is not None else sys.stdout
        self.err: TextIO = err if err is not None else sys.stderr
        # Where confirmations are read from; only its TTY-ness is ours to ask (the prompt
        # itself reads sys.stdin through typer).
        self.inp: TextIO = inp if inp is not None else sys.stdin

    def print(self, text: str = "") -> None:
        self.out.write(shown(text) + "\n")

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
        self.err.write(shown(text))
        self.err.flush()
        return self.inp.readline()

    @property
    def width(self) -> int | None:
        """What human output must fit (terminal_width of stdout)."""
        return terminal_width(self.out)

    def table(self, columns: Sequence[str | Column], rows: Sequence[Sequence[Any]]) -> None:
        """Print a table that fits the terminal (see `table`)."""
        self.print(table(columns, rows, self.width))

    def lines(self, text: str) -> None:
        """Print text whose long lines wrap to the terminal (see `fit_lines`)."""
        self.print(fit_lines(text, self.width))

    def error(self, text: str) -> None:
        self.err.write(shown(text) + "\n")
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


# What a terminal would act on rather than show: C0 controls but newline and tab, DEL, C1
# controls (0x9b is CSI on some terminals), and the Unicode line separators and bidi
# overrides that reorder what is shown.
_UNSHOWABLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
)


def shown(text: str) -> str:
    """`text` with every character a terminal would act on written as an escape (\\x1b):
    human output carries a node's strings (disk paths, PCI names, error messages), and
    a hostile node or file name must not clear the screen, retitle the window or write
    the clipboard (OSC 52). --json and a VM's serial console (Console.write) stay raw."""
    if _UNSHOWABLE.search(text) is None:
        return text
    return _UNSHOWABLE.sub(lambda m: repr(m.group())[1:-1], text)


class Column(NamedTuple):
    """How one column of a human table behaves.

    absent: what a missing value (None) says, in words.
    fit: how the column gives way when the table is wider than the terminal: "keep"
        (never: identifiers), "wrap" (onto more lines: sentences) or "cut" (with an
        ellipsis).
    """

    header: str
    absent: str = "-"
    fit: str = "keep"


class Noted(NamedTuple):
    """A cell whose long reasons are printed once, under the table, as numbered notes:
    Noted("no", ["it carries the root filesystem"]) shows as "no [1]"."""

    text: str
    notes: Sequence[str] = ()


ELLIPSIS = "\u2026"
GAP = "  "
_MIN_WIDTH = 8  # a column that gives way keeps at least this much (or its header)
_MAX_WORD_FLOOR = 16  # a wrapping column keeps words up to this long unbroken


def table(
    columns: Sequence[str | Column],
    rows: Sequence[Sequence[Any]],
    width: int | None = None,
) -> str:
    """A plain, aligned text table (no colours: it must survive pipes and logs).

    Absent values are said in words (Column.absent); Noted cells number their reasons and
    print each distinct reason once, under the table. Given a `width` (the terminal's),
    the columns that may give way wrap or are cut so that every line fits.
    """
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    notes: dict[str, int] = {}
    cells: list[list[str]] = []
    for row in rows:
        line = []
        for col, value in zip(cols, row, strict=True):
            if value is None:
                line.append(col.absent)
            elif isinstance(value, Noted):
                refs = [notes.setdefault(n, len(notes) + 1) for n in value.notes]
                marks = f" [{','.join(map(str, refs))}]" if refs else ""
                line.append(f"{value.text}{marks}")
            else:
                line.append(str(value))
        cells.append(line)
    widths = [max([len(c.header), *(len(r[i]) for r in cells)]) for i, c in enumerate(cols)]
    if width is not None:
        words = [max([0, *(len(w) for r in cells for w in r[i].split())]) for i in range(len(cols))]
        widths = _fit(cols, widths, width, words)
    lines = [GAP.join(c.header.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    for row in cells:
        parts = [_fit_cell(value, col, w) for value, col, w in zip(row, cols, widths, strict=True)]
        for n in range(max(len(p) for p in parts)):
            lines.append(
                GAP.join(
                    (p[n] if n < len(p) else "").ljust(w)
                    for p, w in zip(parts, widths, strict=True)
                )
            )
    for text, number in notes.items():
        lines += _wrap(f"[{number}] {text}", width, len(f"[{number}] "))
    return "\n".join(line.rstrip() for line in lines)


def _fit(cols: Sequence[Column], widths: list[int], width: int, words: Sequence[int]) -> list[int]:
    """Narrow the columns that may give way, widest first, until the table fits (or
    none can give more). A wrapping column keeps its longest word whole (up to
    _MAX_WORD_FLOOR: a long path still wraps inside itself)."""
    widths = list(widths)
    floor = [
        w
        if c.fit == "keep"
        else min(
            w,
            max(len(c.header), _MIN_WIDTH, min(longest, _MAX_WORD_FLOOR) if c.fit == "wrap" else 0),
        )
        for c, w, longest in zip(cols, widths, words, strict=True)
    ]
    excess = sum(widths) + len(GAP) * (len(widths) - 1) - width
    while excess > 0:
        give = [i for i, w in enumerate(widths) if w > floor[i]]
        if not give:
            break
        widest = max(give, key=lambda i: widths[i])
        others = [widths[i] for i in give if i != widest]
        # Down to the next widest (or just enough), one step per round.
        step = min(excess, widths[widest] - max([floor[widest], *others]) or 1)
        widths[widest] -= step
        excess -= step
    return widths


def _fit_cell(value: str, col: Column, width: int) -> list[str]:
    if len(value) <= width:
        return [value]
    if col.fit == "wrap":
        return textwrap.wrap(value, width, break_on_hyphens=False) or [""]
    return [value[: max(width - 1, 0)] + ELLIPSIS]


def _wrap(line: str, width: int | None, indent: int) -> list[str]:
    if width is None or len(line) <= width:
        return [line]
    return textwrap.wrap(line, width, subsequent_indent=" " * indent, break_on_hyphens=False) or [
        line
    ]


# What continuation lines line up after: a list or checklist marker, or the key of a
# "Key    value" summary line (a key is followed by at least two spaces).
_MARKER = r"^\s*(?:- |\[ok\]\s+|\[FAIL\]\s+|fix: |\S.*?\s{2,}(?=\S))?"


def fit_lines(text: str, width: int | None) -> str:
    """Lines longer than `width` wrapped, their continuation lined up after the line's
    indent and marker ("  - ", "[FAIL] ", "fix: ", "Memory  ")."""
    if width is None:
        return text
    out: list[str] = []
    for line in text.split("\n"):
        marker = re.match(_MARKER, line)
        out += _wrap(line, width, len(marker.group(0)) if marker else 0)
    return "\n".join(out)


def terminal_width(stream: Any) -> int | None:
    """The width human output must fit: $COLUMNS, else the terminal's; None (no limit)
    when the output is not a terminal (a pipe or a file keeps whole lines)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns or None
    except (AttributeError, OSError, ValueError):
        pass
    return None


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
