"""Run the documentation's runnable command blocks, as a new user would type them.

A fenced block whose info string is `sh runnable` is run; every other block is an example
that needs what a test machine lacks (a fleet, a node reached over SSH). Blocks of one
page run in order, each by `sh -e -x`, in one sandbox:

- a copy of the checkout (the files git tracks, plus new files not ignored), in a short
  folder under /tmp (AF_UNIX socket paths under .run/ stay short), whose .venv is the
  real one, so `make run` and `make dist` work there as in a fresh clone;
- a temporary HOME, no SPK_VISOR_* / SMECHVISORD_* settings of whoever runs the tests,
  and the venv's bin on PATH (spk-visor installed, as on an admin's workstation);
- `make run` already started by the harness in the sandbox on a free port, as the user
  would have in another terminal (with a fixture sysroot when root, which make run
  requires; see scripts/dev-run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support import devrun, sysroots
from tests.support.sshd import free_port

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```sh runnable[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
BLOCK_TIMEOUT = 300.0


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    text: str


def runnable_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [
        Block(page.name, text.count("\n", 0, m.start()) + 1, m.group(1))
        for m in FENCE.finditer(text)
    ]


def sandbox_env(home: Path, bin_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPK_VISOR_", "SMECHVISORD_", "MAKE", "VIRTUAL_ENV", "XDG_"))
    }
    env["HOME"] = str(home)
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def copy_checkout(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if not src.is_file():  # deleted in the work tree, not yet in git
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    # The project is installed (editable) in the real venv; make run is started with its
    # stamp taken as up to date (tests.support.devrun.MAKE), so nothing is reinstalled.
    (dest / ".venv").symlink_to(Path(sys.executable).parent.parent)


@dataclass
class Sandbox:
    root: Path
    env: dict[str, str]
    port: int
    daemon_log: Path

    def run(self, block: Block) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-e", "-x", "-c", block.text],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )


@contextmanager
def sandbox(start_daemon: bool = True) -> Iterator[Sandbox]:
    root = Path(tempfile.mkdtemp(prefix="readme", dir="/tmp"))
    run: devrun.MakeRun | None = None
    port = free_port()
    try:
        copy_checkout(root)
        (root / ".home").mkdir()
        env = sandbox_env(root / ".home", root / ".venv" / "bin")
        log = root / ".make-run.log"
        if start_daemon:
            extra = []
            if os.geteuid() == 0:
                extra.append(f"SYSROOT={sysroots.build('intel-ready', root / '.sysroot')}")
            run = devrun.start(root, port, env, log, *extra)
            run.wait_serving()
        yield Sandbox(root, env, port, log)
    finally:
        if run is not None:
            run.stop()
        shutil.rmtree(root, ignore_errors=True)


def failure(block: Block, result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{block.page}:{block.line}: a runnable block failed (exit {result.returncode})\n"
        f"--- block\n{block.text}--- stdout\n{result.stdout}--- stderr (sh -x)\n{result.stderr}"
    )
