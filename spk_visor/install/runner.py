"""Running external tools (sfdisk, mkfs, grub-install, ldd, cpio, reboot, ...): argv only,
bounded in time, and a failure raised as the caller's own error with the tool's last
words, so a screen, a REPORT or a log says which tool failed and why.

There is no way to run a tool here without a timeout or to ignore its exit status: a
caller that may go on after a failure catches the error it chose."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TypeVar

# How much of a failing tool's output is kept: the end is where the reason is.
TAIL_CHARS = 2000

_T = TypeVar("_T")


def _env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    return {**os.environ, **env} if env else None


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
            env=_env(env),
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise error(f"{argv[0]}: {e}") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-TAIL_CHARS:]
        raise error(f"{' '.join(argv[:3])} failed ({done.returncode}): {tail}")
    return done.stdout


def _each(argvs: list[list[str]], one: Callable[[list[str]], _T]) -> list[_T | BaseException]:
    """`one(argv)` for every argv at once, one thread each; what each returned or raised,
    in argv order, once all have ended."""
    results: list[_T | BaseException] = [RuntimeError("not run")] * len(argvs)

    def call(i: int) -> None:
        try:
            results[i] = one(argvs[i])
        except BaseException as e:  # handed to the caller's thread
            results[i] = e

    threads = [
        threading.Thread(target=call, args=(i,), name=argv[0]) for i, argv in enumerate(argvs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def run_all(
    argvs: list[list[str]], error: Callable[[str], Exception], *, timeout: float
) -> list[str]:
    """run_checked for several independent tools at once (mkfs of two partitions): each
    bounded by `timeout`, every exit status checked. Returns their stdouts in order;
    once all have ended, the first failure in argv order is raised."""
    out: list[str] = []
    for result in _each(argvs, lambda argv: run_checked(argv, error, timeout=timeout)):
        if isinstance(result, BaseException):
            raise result
        out.append(result)
    return out


def succeeds(argv: list[str], *, timeout: float) -> bool:
    """Whether argv ran and exited 0 within `timeout`: for best-effort steps (a partition
    table re-read, a lazy unmount) whose failure the caller handles by its next check."""
    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def succeeds_each(argvs: list[list[str]], *, timeout: float) -> list[bool]:
    """`succeeds` for several independent best-effort tools at once (wipefs of each old
    partition), in argv order, once all have ended."""
    return [r is True for r in _each(argvs, lambda argv: succeeds(argv, timeout=timeout))]


def pipeline(
    first: list[str],
    second: list[str],
    error: Callable[[str], Exception],
    *,
    timeout: float,
    stdin: IO[bytes],
    stdout: IO[bytes],
    cwd: Path | None = None,
) -> None:
    """`first < stdin | second > stdout`, both bounded by one deadline and both exit
    statuses checked; `error(detail)` names the one that failed."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        a = subprocess.Popen(first, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE)
        procs.append(a)
        b = subprocess.Popen(second, stdin=a.stdout, stdout=stdout)
        procs.append(b)
        if a.stdout is not None:
            a.stdout.close()  # b holds it; a gets SIGPIPE if b dies
        deadline = time.monotonic() + timeout
        for argv, proc in ((second, b), (first, a)):
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
            if rc != 0:
                raise error(f"{argv[0]} failed ({rc})")
    except OSError as e:
        raise error(f"{(first + second)[0]}: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise error(f"{e.cmd[0] if isinstance(e.cmd, list) else e.cmd}: timed out") from e
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
