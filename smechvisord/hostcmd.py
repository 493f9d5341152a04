"""Host commands the daemon runs (modprobe, reboot): argv lists from the settings, no shell.

Every command that changes the host goes through `run_host_command`, so each one gets the
same treatment: no shell (DESIGN.md: argv lists only), no inherited stdin (a command that
asks a question must fail, not hang the API), output captured for the error report, and a
timeout so a stuck command cannot hold a request thread forever.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

# How much of a failing command's output goes into the error: enough for modprobe's
# one-line reasons and a few lines of context, small enough for a JSON error body.
STDERR_TAIL_CHARS = 2000


class HostCommandError(Exception):
    """A host command could not be run, failed, or timed out.

    `exit_code` is None when the command never produced one (not found, not executable,
    killed at the timeout). `stderr` is the tail of its error output (or of its standard
    output when it printed nothing on stderr), for the person reading the error.
    """

    def __init__(
        self, command: Sequence[str], exit_code: int | None, stderr: str, reason: str
    ) -> None:
        self.command = list(command)
        self.exit_code = exit_code
        self.stderr = stderr
        self.reason = reason
        message = f"{' '.join(self.command)}: {reason}"
        if stderr:
            message += f": {stderr}"
        super().__init__(message)


def tail(text: str, limit: int = STDERR_TAIL_CHARS) -> str:
    """The last `limit` characters of `text`, stripped; '...' marks a cut."""
    text = text.strip()
    if len(text) <= limit:
        return text
    return "..." + text[-limit:]


def run_host_command(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `argv` (never through a shell); raise HostCommandError unless it exits 0."""
    command = list(argv)
    if not command:
        raise HostCommandError(command, None, "", "empty command")
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            # Bytes a command prints are not ours to trust to be UTF-8.
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        # subprocess.run has already killed and reaped the child at this point.
        raise HostCommandError(
            command,
            None,
            tail(_text(exc.stderr) or _text(exc.stdout)),
            f"did not finish within {timeout:g} s and was killed",
        ) from exc
    except OSError as exc:
        # Not found, not executable, or the exec itself failed: no exit code exists.
        raise HostCommandError(command, None, "", f"cannot run: {exc.strerror or exc}") from exc
    if result.returncode != 0:
        how = (
            f"killed by signal {-result.returncode}"
            if result.returncode < 0
            else f"exited with status {result.returncode}"
        )
        raise HostCommandError(
            command, result.returncode, tail(result.stderr or result.stdout), how
        )
    return result


def run_reboot(reboot_cmd: Sequence[str], timeout: float = 30.0) -> None:
    """Run the host's reboot command (SMECHVISORD_REBOOT_CMD); HostCommandError on failure.

    The caller writes the firmware-setup request and stops VMs first; this only asks init
    to reboot. OpenRC's `reboot` returns once init has the request, so a timeout here means
    the command is stuck, not that the reboot is slow.
    """
    run_host_command(reboot_cmd, timeout)


def _text(value: str | bytes | None) -> str:
    # TimeoutExpired carries the partial output as bytes even under text=True (POSIX).
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
