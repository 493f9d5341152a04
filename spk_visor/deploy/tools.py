"""Running the disk and boot tools (sfdisk, mkfs, grub-install, mtools, ...): argv only,
bounded in time, and a failure raised as the caller's own error with the tool's last
words, so the receiver's screen and REPORT say which tool failed and why."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

# How much of a failing tool's output is kept: the end is where the reason is.
TAIL_CHARS = 2000


def run_checked(
    argv: list[str],
    error: Callable[[str], Exception],
    *,
    timeout: float,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """stdout of argv; `error(detail)` is raised when it cannot run, times out or fails."""
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=cwd,
            env={**os.environ, **env} if env else None,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise error(f"{argv[0]}: {e}") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-TAIL_CHARS:]
        raise error(f"{' '.join(argv[:3])} failed ({done.returncode}): {tail}")
    return done.stdout
