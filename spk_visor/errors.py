"""Every failure the CLI reports: one base class, shallow branches, one exit code each.

The exit codes are the contract scripts rely on (DESIGN.md, and the man page's EXIT
STATUS section, which is generated from ExitCode).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """What `spk-visor` exits with."""

    OK = 0
    INTERNAL = 1  # a bug, or an answer nothing else explains
    USAGE = 2  # bad arguments, configuration or credentials
    REFUSED = 3  # verification, policy or a precondition (IOMMU not ready, ...) said no
    REBOOT_REQUIRED = 4  # a base image is staged; reboot to use it
    ROLLED_BACK = 5  # an update failed its probation and was rolled back
    BUSY = 6  # another operation holds the lock, or the node is busy
    TRANSIENT = 7  # node unreachable, network trouble, timeout: retrying may help
    NOT_ELIGIBLE = 8  # nothing to do now (no update, window closed)
    OPERATOR_NEEDED = 9  # a person has to look
    UNCHANGED = 77  # nothing to do, only with --unchanged-exit-77 (rpm-ostree convention)
    INTERRUPTED = 130  # Ctrl-C


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.INTERNAL: "internal error, or an answer nothing else explains",
    ExitCode.USAGE: "usage, configuration or credential error",
    ExitCode.REFUSED: "refused: verification, policy or a precondition failed",
    ExitCode.REBOOT_REQUIRED: "reboot required to finish (base image staged)",
    ExitCode.ROLLED_BACK: "the update was rolled back",
    ExitCode.BUSY: "busy: another operation holds the lock",
    ExitCode.TRANSIENT: "transient: node unreachable, network error or timeout",
    ExitCode.NOT_ELIGIBLE: "not eligible now",
    ExitCode.OPERATOR_NEEDED: "an operator is needed",
    ExitCode.UNCHANGED: "unchanged: nothing to do (only with --unchanged-exit-77)",
    ExitCode.INTERRUPTED: "interrupted",
}


# Secrets (API tokens) this process holds: every text the CLI shows about a failure goes
# through `redact`, so an exception that quotes a request header (requests' InvalidHeader,
# http.client's "Invalid header value") or a traceback under --verbose never shows one.
_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
REDACTED = "<redacted>"
# Shorter values are not tokens, and replacing them would garble ordinary text.
_MIN_SECRET_CHARS = 6


def register_secret(value: str | None) -> None:
    """Remember `value` as a secret that `redact` must hide."""
    if value and len(value) >= _MIN_SECRET_CHARS:
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def redact(text: str) -> str:
    """`text` with every registered secret (and its repr-escaped form) replaced."""
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
        escaped = repr(secret)[1:-1]  # how a secret looks inside another value's repr
        if escaped != secret:
            text = text.replace(escaped, REDACTED)
    return text


class SpkVisorError(Exception):
    """Base of every error the CLI reports; `hint` says what to do next."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"

    def document(self) -> dict[str, Any]:
        """The failure as --json shows it, the same for one node and for each node of a
        fleet: {"error": {"message", "hint", "exit_code", "reason"[, "code"]}}; secrets
        redacted. `reason` is the exit code's name; `code` the daemon's error code."""
        error: dict[str, Any] = {
            "message": redact(self.message),
            "hint": redact(self.hint) if self.hint else None,
            "exit_code": int(self.exit_code),
            "reason": ExitCode(self.exit_code).name.lower(),
        }
        code = getattr(self, "code", None)
        if isinstance(code, str):
            error["code"] = code
        return {"error": error}


class ConfigError(SpkVisorError):
    """The configuration (flags, environment or config file) is unusable."""

    exit_code = ExitCode.USAGE


class UsageError(SpkVisorError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = ExitCode.USAGE


class RefusedError(SpkVisorError):
    """A precondition or policy refuses the operation (sealed system, no confirmation)."""

    exit_code = ExitCode.REFUSED


class VerificationError(RefusedError):
    """An update failed verification (signature, hash, expiry, floor, compatibility)."""


class BusyError(SpkVisorError):
    """Another operation holds the lock, or an uncommitted update is pending."""

    exit_code = ExitCode.BUSY


class NotEligibleError(SpkVisorError):
    """Nothing may be done now: rollout bucket, inhibit file, waiting for a base reboot."""

    exit_code = ExitCode.NOT_ELIGIBLE


class OperatorNeededError(SpkVisorError):
    """Automatic recovery gave up; a person has to look."""

    exit_code = ExitCode.OPERATOR_NEEDED


class TransportError(SpkVisorError):
    """The node could not be reached: refused, DNS, timeout, connection lost."""

    exit_code = ExitCode.TRANSIENT


class HostKeyError(TransportError):
    """The SSH host key is unknown or changed: refused, never accepted silently."""

    exit_code = ExitCode.REFUSED


class CertificateError(TransportError):
    """An https node's TLS certificate failed verification: refused, not retried."""

    exit_code = ExitCode.REFUSED


class AuthError(SpkVisorError):
    """The node refused our credentials (API token, or SSH login)."""

    exit_code = ExitCode.USAGE


class ProtocolError(SpkVisorError):
    """Something answered, but not the way smechvisord answers."""

    exit_code = ExitCode.USAGE


# What to do when another service answers on the node's address.
WRONG_SERVICE_HINT = "check the URL and port: is this a SmechVisor node?"


# How a daemon error code maps to an exit code; anything else is INTERNAL.
_DAEMON_EXIT = {
    "invalid_request": ExitCode.USAGE,
    "invalid_json": ExitCode.USAGE,
    "not_found": ExitCode.USAGE,
    "method_not_allowed": ExitCode.USAGE,
    "payload_too_large": ExitCode.USAGE,
    "unsupported_media_type": ExitCode.USAGE,
    "length_required": ExitCode.USAGE,
    "tls_required": ExitCode.USAGE,
    "unauthorized": ExitCode.USAGE,
    "forbidden": ExitCode.USAGE,
    "conflict": ExitCode.REFUSED,
    "iommu_not_ready": ExitCode.REFUSED,
    "unsupported": ExitCode.REFUSED,
    "vmm_unavailable": ExitCode.REFUSED,
    "kvm_unavailable": ExitCode.REFUSED,
    "firmware_missing": ExitCode.REFUSED,
    "busy": ExitCode.BUSY,
    # The request stalled on its way (408): the network, not the command.
    "request_timeout": ExitCode.TRANSIENT,
    "not_implemented": ExitCode.USAGE,
    # The node's state dir is full: someone has to free space (details.vm says what the
    # action really did).
    "insufficient_storage": ExitCode.OPERATOR_NEEDED,
    # The node ran the command and it failed (a VMM that rejects the guest's image, a
    # modprobe on a busy module): someone has to read its output on the node; it is not a
    # fault of this tool, which is what exit 1 says.
    "vmm_failed": ExitCode.OPERATOR_NEEDED,
    "command_failed": ExitCode.OPERATOR_NEEDED,
}


class DaemonError(SpkVisorError):
    """smechvisord answered with its JSON error envelope."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any], node: str
    ) -> None:
        tail = details.get("stderr_tail")
        if isinstance(tail, list) and tail:
            # A VMM that failed to start: its last lines are the only account of why (the
            # failed VM is not kept to look at later).
            message += "\nVMM output (last lines):\n" + "\n".join(
                f"  {line}" for line in tail[-10:]
            )
        super().__init__(f"{node}: {message}")
        self.status = status
        self.code = code
        self.details = details
        self.node = node
        self.exit_code = _DAEMON_EXIT.get(code, ExitCode.INTERNAL)


# ---- OSErrors about paths the user named ------------------------------------------------

# What to say for an OSError, by errno: (what is wrong, what to do). {path} is the path.
_PATH_ERRNO: dict[int, tuple[str, str]] = {
    errno.ENOENT: ("{path}: no such file or folder", "check the path"),
    errno.EISDIR: ("{path} is a folder, not a file", "name a file"),
    errno.ENOTDIR: ("{path}: a part of this path is not a folder", "check the path"),
    errno.EACCES: (
        "{path}: permission denied",
        "check its permissions (and its folder's), or run as a user who may use it",
    ),
    errno.EPERM: ("{path}: operation not permitted", "run as a user who may change it"),
    errno.EEXIST: ("{path} exists", "choose another name, or move it away first"),
    errno.EROFS: ("{path}: read-only file system", "choose a writable place"),
    errno.ENOSPC: ("{path}: no space left on the device", "free some space and run again"),
    errno.EDQUOT: ("{path}: disk quota exceeded", "free some space and run again"),
    errno.ENAMETOOLONG: ("{path}: name too long", "choose a shorter path"),
    errno.ELOOP: ("{path}: too many symbolic links", "check the path"),
}


def _candidates(argv: Sequence[str]) -> list[str]:
    """Words of the command line that may be paths: arguments and option values."""
    out = []
    for arg in argv:
        word = arg
        if arg.startswith("-"):
            if "=" not in arg:
                continue
            word = arg.split("=", 1)[1]
        if word and word != "-" and "\0" not in word:
            out.append(os.path.abspath(os.path.expanduser(word)))
    return out


def _related(path: str, named: str) -> bool:
    """`path` is `named`, a folder above it, something under it, or a file beside it that
    is named after it (KEY.pub, X.manifest.json beside X.spkb, a .X.tmp)."""
    if path == named or path.startswith(named + "/"):
        return True
    if path != "/" and named.startswith(path + "/"):  # a folder on the way to it
        return True
    if os.path.dirname(path) != os.path.dirname(named):
        return False
    stem = os.path.splitext(os.path.basename(named))[0]
    return bool(stem) and os.path.basename(path).lstrip(".").startswith(stem)


def user_path_error(e: OSError, argv: Sequence[str]) -> UsageError | None:
    """The UsageError (exit 2) to report for `e` when it is about a path named on the
    command line `argv` (or one derived from it), else None: an OSError about any other
    path is not the user's doing and stays an internal error."""
    names = [n for n in (e.filename, e.filename2) if isinstance(n, str | bytes | os.PathLike)]
    paths = [os.path.abspath(os.fsdecode(n)) for n in names]
    named = _candidates(argv)
    # A rename names two paths; the one the user typed is the one to talk about.
    order = sorted(zip(paths, names, strict=True), key=lambda pn: pn[0] not in named)
    for path, shown in order:
        if any(_related(path, n) for n in named):
            what, hint = _PATH_ERRNO.get(
                e.errno or 0, ("{path}: " + (e.strerror or str(e)), "check the path")
            )
            return UsageError(what.format(path=os.fsdecode(shown)), hint)
    return None
