"""A bundle given as a pipe, made a file: `ota push BUNDLE` and `deploy send --bundle`
read their bundle many times (once per node, at offsets), and take its size first; a pipe
(`<(curl ...)`, a named FIFO, `/dev/stdin`, `-`) can be read once, has no size, and a
second open of a FIFO waits for a writer that never comes.

So a bundle that is not a regular file is copied once into a temporary file under
$TMPDIR or /tmp that has no name (readers reopen it as /proc/self/fd/N; it is gone when
the command ends, however it ends, even on SIGTERM or SIGKILL), checked like a named
bundle once its first SNIFF_BYTES (1 MiB) or the whole input, if shorter, are in
(something that is not a bundle is refused before the rest is read: /dev/zero fills no
disk), and capped at MAX_SPOOL bytes. A regular file is used where it is.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from spk_visor.errors import UsageError
from spk_visor.ota import bundle as ota_bundle

# Far above any release (a base image is a few GiB), and a bound for a stream that never
# ends: the temporary folder is not filled without limit.
MAX_SPOOL = 64 << 30
CHUNK = 1 << 20
POLL_MS = 500
STDIN = "-"
SPOOL_HINT = (
    "save the bundle to a file first (curl -o spk.spkb URL) and push that file, "
    "or set TMPDIR to a folder with room"
)


@contextlib.contextmanager
def as_file(path: Path | str) -> Iterator[Path]:
    """`path` itself if it is a regular file (or cannot be looked at: its reader names the
    error); else a private copy of what it yields, removed on exit. "-" is stdin.

    UsageError (2): what the pipe yields is not a bundle, is over MAX_SPOOL bytes, or the
    temporary folder has no room for it."""
    name = str(path)
    if name != STDIN:
        try:
            mode = os.stat(name).st_mode
        except OSError:
            mode = stat.S_IFREG
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # a folder: its reader says so
            yield Path(name)
            return
    elif sys.stdin.isatty():
        raise UsageError(
            "the bundle is read from stdin (-), and stdin is a terminal",
            "pipe the bundle in (curl URL | spk-visor ota push - ...), or name the file",
        )
    try:
        # Unnamed from the start (O_TMPFILE, else unlinked at once): nothing is left in
        # TMPDIR however the command ends, even on SIGTERM from `timeout` or SIGKILL. Its
        # readers open it again through /proc/self/fd, each at its own offset.
        spooled = tempfile.TemporaryFile(prefix="spk-visor-bundle-")  # noqa: SIM115
    except OSError as e:  # no usable temporary folder at all
        raise UsageError(f"cannot make a temporary file: {e.strerror or e}", SPOOL_HINT) from e
    with spooled:
        _copy(name, spooled)
        yield Path(f"/proc/self/fd/{spooled.fileno()}")


def _copy(name: str, sink: BinaryIO) -> None:
    shown = "stdin" if name == STDIN else name
    try:
        source = sys.stdin.buffer if name == STDIN else open(name, "rb")  # noqa: SIM115
    except OSError as e:
        raise UsageError(
            f"cannot read the bundle {name}: {e.strerror or e}", ota_bundle.missing_hint(e)
        ) from e
    try:
        head = b""
        done = 0
        fd = source.fileno()
        wait = select.poll()
        wait.register(fd, select.POLLIN)
        while True:
            try:
                # Python runs a signal's handler between bytecodes, not inside a blocked
                # read: one that lands just before a read of a stalled pipe would wait for
                # data that never comes. The poll wakes at least every POLL_MS.
                if not wait.poll(POLL_MS):
                    continue
                chunk = _read(fd)
            except OSError as e:  # the source's fault, not the temporary folder's
                raise UsageError(
                    f"cannot read the bundle from {shown}: {e.strerror or e}",
                    "check where the bundle comes from (the download, the pipe's writer)",
                ) from e
            if not chunk:
                break
            if len(head) < ota_bundle.SNIFF_BYTES:
                head += chunk[: ota_bundle.SNIFF_BYTES - len(head)]
                if len(head) >= ota_bundle.SNIFF_BYTES:
                    _check_head(shown, head)
            done += len(chunk)
            if done > MAX_SPOOL:
                raise UsageError(
                    f"the bundle from {shown} is over {MAX_SPOOL >> 30} GiB; "
                    "a pipe is copied to a temporary file first",
                    SPOOL_HINT,
                )
            try:
                sink.write(chunk)
            except OSError as e:
                raise _no_room(shown, e) from e
        if len(head) < ota_bundle.SNIFF_BYTES:
            _check_head(shown, head)
        try:
            sink.flush()  # the last buffered bytes: a full disk can refuse them too
        except OSError as e:
            raise _no_room(shown, e) from e
    finally:
        if source is not sys.stdin.buffer:
            source.close()


def _no_room(shown: str, e: OSError) -> UsageError:
    return UsageError(
        f"cannot copy the bundle from {shown} to {tempfile.gettempdir()}: {e.strerror or e}",
        SPOOL_HINT,
    )


def _read(fd: int) -> bytes:
    """What the source has, up to CHUNK bytes (b"" at its end)."""
    return os.read(fd, CHUNK)


def _check_head(shown: str, head: bytes) -> None:
    why = ota_bundle.not_a_bundle(head)
    if why is not None:
        raise UsageError(f"{shown} is not an OTA bundle: {why}", ota_bundle.NOT_A_BUNDLE_HINT)
