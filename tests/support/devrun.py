"""`make run` started by a test, as a user starts it in another terminal, and stopped.

The recipe exec's the daemon (scripts/dev-run), so make's child is the daemon itself; it
is stopped by the PID its own /api/health reports on the test's port, never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.health import health

# The venv's stamp counts as up to date: a test must not reinstall the project.
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]


@dataclass
class MakeRun:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def health(self) -> dict[str, Any] | None:
        return health(self.port)

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.health() is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"make run did not serve:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        pid = (self.health() or {}).get("pid")
        if isinstance(pid, int):
            os.kill(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start(cwd: Path, port: int, env: dict[str, str], log: Path, *make_vars: str) -> MakeRun:
    """`make run BIND=127.0.0.1:PORT MAKE_VARS...` in `cwd`, its output into `log`."""
    argv = [*MAKE, "run", f"BIND=127.0.0.1:{port}", *make_vars]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    return MakeRun(proc, port, log)
