"""A progress bar on stderr for requests that can take more than a second (a graceful VM
shutdown, a VM's first boot, a reboot into firmware setup).

The daemon answers such a request only when the work is done, so the bar shows time spent
against the worst case rather than steps. It is drawn only when stderr is a terminal:
pipes, logs and cron mail stay clean, and stdout (results, --json) is never touched.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from spk_visor.output import Console

# How often the bar is redrawn: smooth enough to look alive, cheap enough to ignore.
TICK_SECONDS = 0.2
FALLBACK_COLUMNS = 80
# Below this a fleet answers before a bar is worth drawing.
FLEET_BAR_MIN = 5


@contextmanager
def waiting(console: Console, desc: str, at_most: float) -> Iterator[None]:
    """Show `desc` with the seconds spent out of `at_most` while the body runs."""
    if not console.err_is_tty:
        yield
        return
    # Imported here so that commands without a bar do not pay for tqdm at start-up.
    from tqdm import tqdm  # noqa: PLC0415

    total = max(1, round(at_most))
    # A serial console or a fresh pty reports 0 columns, and tqdm would then draw nothing.
    width = _columns(console.err)
    bar = tqdm(
        total=total,
        desc=desc,
        file=console.err,
        leave=False,
        dynamic_ncols=width > 0,
        ncols=None if width > 0 else FALLBACK_COLUMNS,
        bar_format="{desc}: {bar} {elapsed} (at most " + f"{total} s)",
    )
    stop = threading.Event()
    started = time.monotonic()

    def tick() -> None:
        while not stop.wait(TICK_SECONDS):
            bar.n = min(total, int(time.monotonic() - started))
            bar.refresh()

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()


@contextmanager
def fleet_progress(console: Console, total: int) -> Iterator[Callable[[Any], None]]:
    """A bar counting the nodes that have answered, for fleets of more than a few nodes;
    yields the callback to call once per node (from any thread)."""
    if total < FLEET_BAR_MIN or not console.err_is_tty:
        yield lambda _result: None
        return
    from tqdm import tqdm  # noqa: PLC0415 (only a terminal pays for it)

    width = _columns(console.err)
    bar = tqdm(
        total=total,
        desc="nodes",
        unit="node",
        file=console.err,
        leave=False,
        dynamic_ncols=width > 0,
        ncols=None if width > 0 else FALLBACK_COLUMNS,
    )
    lock = threading.Lock()

    def tick(_result: Any) -> None:
        with lock:  # tqdm's own lock is per class; keep the count exact across workers
            bar.update(1)

    try:
        yield tick
    finally:
        bar.close()


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0
