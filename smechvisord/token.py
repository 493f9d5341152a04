"""The API bearer token: created once, 0600, and compared in constant time."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from smechvisord import atomic

MIN_TOKEN_CHARS = 16
log = logging.getLogger(__name__)


class TokenError(RuntimeError):
    """The token file exists but cannot be used."""


def load_or_create(path: Path) -> str:
    """Read the token, or create it (0600, parent 0700) at first start."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        atomic.write_bytes(path, token.encode() + b"\n", mode=0o600)
        return token
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"cannot read token file {path}: {e}") from e
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(
            f"token file {path} holds fewer than {MIN_TOKEN_CHARS} characters; "
            "delete it and restart to generate a new one"
        )
    if os.stat(path).st_mode & 0o077:
        # A token others can read is a credential leak: tighten it and say so.
        log.warning("token file %s was readable by others; set it to 0600", path)
        os.chmod(path, 0o600)
    return token


def matches(expected: str, presented: str) -> bool:
    return hmac.compare_digest(expected.encode(), presented.encode())
