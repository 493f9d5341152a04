"""The one exception routes raise; the server turns it into the JSON error envelope."""

from __future__ import annotations

from typing import Any

from smechvisord.protocol import ERR_INVALID_REQUEST


class ApiError(Exception):
    """A request the daemon refuses or could not do; `code` is one of protocol.ERR_*."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    def envelope(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def invalid(field: str, message: str, **details: Any) -> ApiError:
    """400 naming the field at fault, so the CLI and dashboard can point at it."""
    return ApiError(400, ERR_INVALID_REQUEST, f"{field}: {message}", {"field": field, **details})
