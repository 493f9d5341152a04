"""The API bearer token: created once, readable by root (and by the token group, when it
exists), and compared in constant time.

The token group (SMECHVISORD_TOKEN_GROUP, default `smechvisor`) is how a non-root admin
is authorised: `spk-visor --ssh admin@node` reads the token over SFTP as that user, so an
admin in the group can use the API, and nobody else can. While the group does not exist
the token stays 0600 root.
"""

from __future__ import annotations

import grp
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from smechvisord import atomic

MIN_TOKEN_CHARS = 16
SHARED_MODE = 0o640  # owner rw, the token group r, others nothing
PRIVATE_MODE = 0o600
log = logging.getLogger(__name__)


class TokenError(RuntimeError):
    """The token file exists but cannot be used."""


def group_id(name: str) -> int | None:
    """The gid of the token group, None when none is configured or it does not exist."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def load_or_create(path: Path, group: str = "") -> str:
    """Read the token, or create it (parent 0700) at first start; then give it the mode
    the token group calls for (0640 root:GROUP, or 0600)."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        atomic.write_bytes(path, token.encode() + b"\n", mode=PRIVATE_MODE)
        _set_access(path, group, created=True)
        return token
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"cannot read token file {path}: {e}") from e
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(
            f"token file {path} holds fewer than {MIN_TOKEN_CHARS} characters; "
            "delete it and restart to generate a new one"
        )
    _set_access(path, group, created=False)
    return token


def _set_access(path: Path, group: str, created: bool) -> None:
    gid = group_id(group)
    st = os.stat(path)
    if gid is not None:
        try:
            if st.st_gid != gid:
                os.chown(path, -1, gid)
            if stat.S_IMODE(st.st_mode) != SHARED_MODE:
                os.chmod(path, SHARED_MODE)
            _let_group_in(path.parent, gid, group)
        except OSError as e:  # not root (make run), or a read-only /etc
            log.warning("cannot share token file %s with group %s: %s", path, group, e)
            gid = None
        else:
            if created or st.st_gid != gid:
                log.info("token file %s: readable by group %s (0640)", path, group)
            return
    if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        # A token others can read is a credential leak: tighten it and say so.
        log.warning("token file %s was readable by others; set it to 0600", path)
        os.chmod(path, PRIVATE_MODE)
    elif group and created:
        log.info("token file %s: root only (no group %r on this system)", path, group)


def _let_group_in(directory: Path, gid: int, group: str) -> None:
    """Members of the token group must be able to pass through the token's directory.
    A directory of ours with no group bits (the 0700 made at first start) gets the group
    and g+x (0710): they can open the token by name but not list the directory."""
    st = os.stat(directory)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o001 or (st.st_gid == gid and mode & 0o010):
        return
    if st.st_uid == os.geteuid() and not mode & 0o070:
        os.chown(directory, -1, gid)
        os.chmod(directory, mode | 0o010)  # noqa: S103 (g+x only: search, not read)
        return
    log.warning(
        "group %s cannot reach the token: %s is not searchable by it (chgrp %s and chmod g+x)",
        group,
        directory,
        group,
    )


def matches(expected: str, presented: str) -> bool:
    return hmac.compare_digest(expected.encode(), presented.encode())
