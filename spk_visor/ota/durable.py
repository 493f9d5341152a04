"""The durable primitives the crash-safety story rests on (ota.md, "Durable primitives").

Every write that must survive a power cut goes through here: temp file, fsync, rename,
fsync the directory. `crash_point` lets tests cut power (SIGKILL) right after any named
durable step, the way Mender's state tests kill the client in each state.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from smechvisord.atomic import fsync_dir, write_bytes, write_json

__all__ = [
    "CRASH_ENV",
    "crash_point",
    "flip_symlink",
    "fsync_dir",
    "fsync_tree",
    "write_bytes",
    "write_json",
]

# Comma-separated step names; the process kills itself with SIGKILL right after the
# first of them it reaches. Only tests set it.
CRASH_ENV = "SPK_VISOR_OTA_CRASH_AT"


def crash_point(step: str) -> None:
    """Die here, as a power cut would, if the test asked for a crash at `step`."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted and step in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


def flip_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically: at every instant it names old or new, never none.

    A versioned directory plus a renamed symlink leaves no window with a missing or
    half-written binary at the live path (unlike rename-dance self-updaters).
    """
    tmp = link.with_name(link.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (bottom-up), then `root` itself."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
