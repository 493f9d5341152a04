"""One daemon per state dir: an flock held for the daemon's life.

Two daemons on one state dir would each re-adopt the other's VMs and write the same
records (issue 10). The lock file holds the holder's PID so the second one can name it;
the kernel drops the lock when the holder exits, however it exits, so a stale file never
blocks a restart. VMMs do not inherit it (Python opens files close-on-exec).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "smechvisord.lock"


class StateDirBusyError(RuntimeError):
    pass


def acquire(state_dir: Path) -> int:
    """Lock `state_dir` and return the lock's descriptor (keep it open), or raise
    StateDirBusyError naming the PID that holds it."""
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f"smechvisord PID {holder}" if holder else "another smechvisord"
        raise StateDirBusyError(
            f"state dir {state_dir} is in use by {who}: stop it, or give this daemon "
            "another SMECHVISORD_STATE_DIR"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() else None
