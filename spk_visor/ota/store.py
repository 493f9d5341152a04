"""The node's private blob store: content-addressed, and only verified bytes get in.

A blob is written under store/partial/, hashed as it streams, fsynced, and renamed into
store/blobs/sha256/<hex> only when its sha256 and size match the signed manifest. So a
file in blobs/ is verified by construction; a crash leaves at most a partial file, which a
resumable download continues and everything else overwrites.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from spk_visor.errors import VerificationError
from spk_visor.ota import durable
from spk_visor.ota.nodeconf import NodePaths
from spk_visor.trust.verify import BlobCheck, require_blob_hash

CHUNK = 1 << 20
Progress = Callable[[int], None]


def hex_of(blob_id: str) -> str:
    return blob_id.split(":", 1)[1]


class TruncatedError(VerificationError):
    """The stream ended before the size the signed manifest declares."""


@dataclass
class BlobStore:
    paths: NodePaths

    @property
    def blobs_dir(self) -> Path:
        return self.paths.store / "blobs" / "sha256"

    @property
    def partial_dir(self) -> Path:
        return self.paths.store / "partial"

    @property
    def manifests_dir(self) -> Path:
        return self.paths.store / "manifests"

    def ensure(self) -> None:
        for d in (self.blobs_dir, self.partial_dir, self.manifests_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, blob_id: str) -> Path:
        return self.blobs_dir / hex_of(blob_id)

    def partial(self, blob_id: str) -> Path:
        return self.partial_dir / f"{hex_of(blob_id)}.part"

    def has(self, blob_id: str, size: int) -> bool:
        try:
            return self.path(blob_id).stat().st_size == size
        except FileNotFoundError:
            return False

    def missing(self, blobs: dict[str, int]) -> dict[str, int]:
        return {b: s for b, s in blobs.items() if not self.has(b, s)}

    def ingest(
        self,
        stream: BinaryIO,
        blob_id: str,
        size: int,
        progress: Progress | None = None,
        *,
        commit: bool = True,
    ) -> Path:
        """Copy exactly `size` bytes of `stream` into the store, verifying the hash.

        Raises TruncatedError when the stream ends early and VerificationError when the
        hash differs; neither leaves anything in blobs/. With commit=False the verified
        bytes stay in partial/ until `promote` (a bundle's blobs enter the store together,
        once the whole bundle checked out).
        """
        self.ensure()
        part = self.partial(blob_id)
        check = BlobCheck(blob_id, size)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while check.remaining:
                chunk = stream.read(min(CHUNK, check.remaining))
                if not chunk:
                    raise TruncatedError(
                        f"bundle truncated: blob {blob_id[:19]}… ended "
                        f"{check.remaining} bytes short of its signed size",
                        "copy the bundle again",
                    )
                check.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                if progress:
                    progress(len(chunk))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise
        os.close(fd)
        if not commit:
            self.check_partial(blob_id, check.hexdigest())
            return part
        return self.commit_partial(blob_id, check.hexdigest())

    def check_partial(self, blob_id: str, actual_hex: str) -> None:
        try:
            require_blob_hash(blob_id, actual_hex)
        except VerificationError:
            self.discard_partial(blob_id)
            raise

    def promote(self, blob_id: str) -> Path:
        """Move an already verified partial file into blobs/."""
        final = self.path(blob_id)
        os.replace(self.partial(blob_id), final)
        durable.fsync_dir(final.parent)
        return final

    def discard_partial(self, blob_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.partial(blob_id).unlink()

    def commit_partial(self, blob_id: str, actual_hex: str) -> Path:
        """Move a fully written partial file into blobs/ if its hash is the expected one."""
        self.check_partial(blob_id, actual_hex)
        return self.promote(blob_id)

    def save_manifest(self, manifest_hex: str, envelope: bytes) -> Path:
        self.ensure()
        path = self.manifests_dir / f"{manifest_hex}.json"
        if not path.exists():
            durable.write_bytes(path, envelope)
        return path

    def load_manifest(self, manifest_hex: str) -> bytes:
        return (self.manifests_dir / f"{manifest_hex}.json").read_bytes()

    def gc(self, keep_blobs: Iterable[str], keep_manifests: Iterable[str]) -> int:
        """Remove blobs and manifests no longer needed; returns bytes freed."""
        keep = {hex_of(b) for b in keep_blobs}
        keep_m = {f"{m}.json" for m in keep_manifests}
        freed = 0
        for directory, wanted in ((self.blobs_dir, keep), (self.manifests_dir, keep_m)):
            if not directory.is_dir():
                continue
            for entry in directory.iterdir():
                if entry.name not in wanted:
                    with contextlib.suppress(FileNotFoundError):
                        freed += entry.stat().st_size
                        entry.unlink()
        return freed


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            if progress:
                progress(n)
    return digest.hexdigest()
