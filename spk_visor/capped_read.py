"""Read a file named by the user no further than a size cap; append only to a file."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from spk_visor.errors import ConfigError


class NotAFileError(OSError):
    """The path names a pipe or a socket: nothing to read as a settings file."""


def read_at_most(path: Path, limit: int) -> bytes:
    """At most `limit + 1` bytes of `path`: more than `limit` means too large, found
    without reading it whole (a device such as /dev/zero never ends, and a wrong
    multi-gigabyte file would be read into memory). OSError as path.read_bytes(); a
    named pipe or socket raises NotAFileError, a folder IsADirectoryError."""
    # O_NONBLOCK: opening a named pipe with no writer would otherwise wait forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            kind = "a named pipe" if stat.S_ISFIFO(mode) else "a socket"
            raise NotAFileError(errno.EINVAL, f"is {kind}, not a file", str(path))
        # A file or a device: reads may block again (a device is still capped below).
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)


def regular_size(fd: int, path: Path) -> int | None:
    """The size of the file open at `fd`, for an append to a settings file; None if it is
    /dev/null: "keep no key", as OpenSSH takes UserKnownHostsFile=/dev/null (the line is
    not written). ConfigError (exit 2) for a pipe, a socket or any other device: a line
    written there would go to whoever reads it, or nowhere the user meant."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev:
        return None
    raise ConfigError(
        f"{path} is not a regular file: a key is only ever added to a file",
        f"name a file there, or {os.devnull} to keep no key",
    )
