"""Every failure the CLI reports: one base class, shallow branches, one exit code each.

The exit codes are the contract scripts rely on (DESIGN.md, and the man page's EXIT
STATUS section, which is generated from ExitCode).
"""

from __future__ import annotations

import threading
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


# How a daemon error code maps to an exit code; anything else is INTERNAL.
_DAEMON_EXIT = {
    "invalid_request": ExitCode.USAGE,
    "invalid_json": ExitCode.USAGE,
    "not_found": ExitCode.USAGE,
    "method_not_allowed": ExitCode.USAGE,
    "payload_too_large": ExitCode.USAGE,
    "unsupported_media_type": ExitCode.USAGE,
    "length_required": ExitCode.USAGE,
    "unauthorized": ExitCode.USAGE,
    "forbidden": ExitCode.USAGE,
    "conflict": ExitCode.REFUSED,
    "iommu_not_ready": ExitCode.REFUSED,
    "unsupported": ExitCode.REFUSED,
    "vmm_unavailable": ExitCode.REFUSED,
    "kvm_unavailable": ExitCode.REFUSED,
    "firmware_missing": ExitCode.REFUSED,
    "busy": ExitCode.BUSY,
}


class DaemonError(SpkVisorError):
    """smechvisord answered with its JSON error envelope."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any], node: str
    ) -> None:
        super().__init__(f"{node}: {message}")
        self.status = status
        self.code = code
        self.details = details
        self.node = node
        self.exit_code = _DAEMON_EXIT.get(code, ExitCode.INTERNAL)
