"""The `.spkb` bundle framing: one file carrying a manifest envelope, roots and blobs.

    magic "SPKOTA\\0\\1" (8 bytes) | u32be envelope_len (<= 1 MiB) |
    envelope JSON {"manifest": <DSSE>, "roots": [<DSSE>, ...]} |
    blob bytes concatenated in the manifest's blob order | EOF

Only the two bounded lengths are read before verification; blob sizes come from the
signed manifest, never from the bundle itself. Trailing bytes after the last blob are
refused. No tar, no headers per blob, nothing unsigned that steers the install.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from spk_visor import strict_json
from spk_visor.errors import UsageError, VerificationError
from spk_visor.trust import dsse

MAGIC = b"SPKOTA\x00\x01"
MAX_ENVELOPE = 1 << 20
COPY_CHUNK = 4 << 20
# The pipe a pushed bundle arrives through (sshd writes, `ota apply --bundle -` reads).
# Linux's default of 64 KiB wakes the reader for every 64 KiB, and on a busy node each
# wake-up waits for a CPU: a 64 MiB push over loopback at load 10 on 2 CPUs took 1.6 s
# with it and 0.6 s with 1 MiB, with a third of sshd's and the reader's CPU time
# (bench/ota_push_rack.py). 1 MiB is the most an unprivileged process may ask for
# (/proc/sys/fs/pipe-max-size).
STDIN_PIPE_SIZE = 1 << 20


def widen_pipe(stream: IO[bytes] | IO[str]) -> None:
    """Give the pipe `stream` reads from STDIN_PIPE_SIZE of buffer; nothing if it is not
    a pipe (a file, a terminal, an in-memory stream) or the system refuses (a lower
    pipe-max-size)."""
    with contextlib.suppress(OSError, ValueError):  # io.UnsupportedOperation is both
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, STDIN_PIPE_SIZE)


# What a file is, when it is not a bundle: enough of its start to tell (not_a_bundle).
SNIFF_BYTES = 1 << 20
NOT_A_BUNDLE_HINT = "give the .spkb file `spk-visor ota build` wrote"


def not_a_bundle(head: bytes) -> str | None:
    """Why a file starting with `head` is not a bundle (an empty file, a key, a JSON
    document, anything without the magic), or None if it starts like one. Only the magic
    is looked at, not its format version (the magic's last 2 bytes): a reader judges that
    itself, and may read a newer one."""
    if not head.strip():
        return "an empty file"
    if head.lstrip().startswith(b"-----BEGIN"):
        return "a PEM key or certificate"
    if head.lstrip().startswith(b"{"):
        try:
            json.loads(head)
            return "a JSON document (a root.json or a public key?)"
        except ValueError:
            pass
    if not head.startswith(MAGIC[:-2]):
        return "it does not start with the bundle magic"
    return None


def check_is_bundle(path: Path | str) -> None:
    """UsageError (exit 2) if the user named a folder or a regular file that is not a
    bundle (root.json, a key, /etc/passwd): one local mistake, said once, before any node
    is contacted or anything is streamed. Only a regular file is read (its first
    SNIFF_BYTES, at offset 0); a pipe (`-b <(...)`), a FIFO or a device is left to its
    reader, as stdin is, since reading ahead would take bytes the reader needs. A path
    that cannot be looked at is left to the caller, which names it (see missing_hint)."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{path} is not an OTA bundle: it is a folder", NOT_A_BUNDLE_HINT)
        if not stat.S_ISREG(st.st_mode):
            return
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does
        # not wait for a writer, and fstat says so before anything is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        head = os.pread(fd, SNIFF_BYTES, 0)
    except OSError:
        return
    finally:
        os.close(fd)
    why = not_a_bundle(head)
    if why is not None:
        raise UsageError(f"{path} is not an OTA bundle: {why}", NOT_A_BUNDLE_HINT)


def check_pipe_start(f: io.BufferedReader, path: Path | str) -> None:
    """UsageError (exit 2), as check_is_bundle says of a file, if the pipe (or device)
    `f` that the user named starts with something other than a bundle: nothing at all, an
    error page, zeros. Only what one read brings is looked at (peek), and left for the
    reader; bytes that may yet become the magic pass. A regular file passes:
    check_is_bundle looked at it already."""
    try:
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return
        head = f.peek(SNIFF_BYTES)
    except OSError:
        return  # the reader meets it again and says so
    complete = len(head) >= len(MAGIC) - 2
    if not head or (complete and not head.startswith(MAGIC[:-2])):
        why = not_a_bundle(head)
    elif not complete and not MAGIC.startswith(head):
        why = "it does not start with the bundle magic"
    else:
        return
    if why is not None:
        raise UsageError(f"{path} is not an OTA bundle: {why}", NOT_A_BUNDLE_HINT)


def missing_hint(e: OSError) -> str | None:
    """The hint for a bundle that could not be opened: a missing one is most likely a
    wrong path or a bundle not built yet; other errors (permissions) say enough."""
    return "check the path; " + NOT_A_BUNDLE_HINT if isinstance(e, FileNotFoundError) else None


@dataclass
class BundleHeader:
    manifest: dsse.Envelope
    roots: list[dsse.Envelope]
    blobs_offset: int


def _read_exact(stream: BinaryIO, n: int, what: str) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise VerificationError(f"bundle truncated in the {what}", "copy the bundle again")
        data += chunk
    return data


def read_header(stream: BinaryIO) -> BundleHeader:
    magic = _read_exact(stream, len(MAGIC), "magic")
    if magic != MAGIC:
        if magic[:6] == MAGIC[:6]:
            raise VerificationError(
                f"bundle format {magic[6]}.{magic[7]} is not supported (this agent reads 0.1)",
                "update spk-visor first",
            )
        raise VerificationError("not a spk-visor OTA bundle (bad magic)")
    (length,) = struct.unpack(">I", _read_exact(stream, 4, "envelope length"))
    if not 2 <= length <= MAX_ENVELOPE:
        raise VerificationError(f"bundle envelope length {length} is out of bounds")
    raw = _read_exact(stream, length, "envelope")
    try:
        doc = strict_json.loads(raw)
    except ValueError as e:
        raise VerificationError(f"bundle envelope is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or "manifest" not in doc:
        raise VerificationError("bundle envelope has no manifest")
    roots_doc = doc.get("roots", [])
    if not isinstance(roots_doc, list):
        raise VerificationError("bundle envelope: roots is not a list")
    manifest = dsse.from_doc(doc["manifest"], dsse.MANIFEST_TYPE)
    roots = [dsse.from_doc(r, dsse.ROOT_TYPE) for r in roots_doc[:32]]
    return BundleHeader(manifest, roots, len(MAGIC) + 4 + length)


def write(
    out: BinaryIO,
    manifest: dsse.Envelope,
    roots: Iterable[dsse.Envelope],
    blob_files: Iterable[Path],
    progress: Callable[[int], None] | None = None,
) -> None:
    envelope = json.dumps(
        {"manifest": manifest.to_doc(), "roots": [r.to_doc() for r in roots]},
        separators=(",", ":"),
    ).encode()
    if len(envelope) > MAX_ENVELOPE:
        raise VerificationError("the manifest is too large for a bundle (over 1 MiB)")
    out.write(MAGIC + struct.pack(">I", len(envelope)) + envelope)
    for path in blob_files:
        with path.open("rb") as f:
            while chunk := f.read(COPY_CHUNK):
                out.write(chunk)
                if progress:
                    progress(len(chunk))


def expect_eof(stream: BinaryIO) -> None:
    if stream.read(1):
        raise VerificationError(
            "bundle has bytes after its last blob", "the bundle is corrupt or tampered with"
        )
