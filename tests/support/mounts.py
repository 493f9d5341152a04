"""Unmounting in tests' teardowns, so that no run leaves a mount behind."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

# A mount is often busy for a moment after its last user exits (a close still in flight,
# udev probing a fresh loop device): a few tries before the lazy fallback.
TRIES = 3
PAUSE = 0.2


def unmount(mnt: Path) -> None:
    """Unmount `mnt`: retried, then lazily (`umount -l`: detached now, released when its
    last open file closes), so the mountpoint is free to remove either way.

    Raises:
        OSError: `mnt` is still a mount point after the lazy unmount.
    """
    for attempt in range(TRIES):
        if not os.path.ismount(mnt):
            return
        run = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60, check=False)
        if run.returncode == 0:
            return
        if attempt + 1 < TRIES:
            time.sleep(PAUSE)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60, check=False)
    if os.path.ismount(mnt):
        raise OSError(f"{mnt} is still mounted after umount -l")
