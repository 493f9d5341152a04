"""The static pull repository: publish bundles into it, sign its channel documents.

    <repo>/v1/root/<N>.root.json                 immutable
    <repo>/v1/channels/<name>.json               the one mutable object, written last
    <repo>/v1/manifests/<sha256-of-payload>.json immutable
    <repo>/v1/blobs/sha256/<hex>                 immutable

Publish order is blobs, manifest, roots, channel: a client never sees a channel pointing
to something not yet there, and a stale CDN edge can only serve an older channel, which
the serial check refuses harmlessly. Any static web server or CDN can serve the tree.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from spk_visor import new_folder
from spk_visor.errors import UsageError, VerificationError
from spk_visor.ota import bundle, durable
from spk_visor.ota.store import CHUNK
from spk_visor.trust import dsse, manifest
from spk_visor.trust.keys import SigningKey
from spk_visor.trust.roots import format_time, parse_unverified
from spk_visor.trust.verify import CHANNEL_DOC_TYPE


def rel_root(version: int) -> str:
    return f"root/{version}.root.json"


def rel_channel(name: str) -> str:
    return f"channels/{name}.json"


def rel_manifest(sha: str) -> str:
    return f"manifests/{sha}.json"


def rel_blob(blob_id: str) -> str:
    return f"blobs/sha256/{blob_id.split(':', 1)[1]}"


@dataclass
class Repo:
    root: Path

    def check_place(self) -> None:
        """Before anything is read or written for a publish: the repository folder may be
        new (a first publish makes it), but the folder it goes in must exist."""
        new_folder.check(self.root, f"--repo {self.root}")

    @property
    def v1(self) -> Path:
        return self.root / "v1"

    def path(self, rel: str) -> Path:
        return self.v1 / rel

    def _write(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_bytes(path, data, 0o644)

    def add_blob(self, stream: BinaryIO, blob_id: str, size: int) -> None:
        """Copy exactly `size` bytes, checking the hash; an existing blob is skipped."""
        path = self.path(rel_blob(blob_id))
        if path.is_file() and path.stat().st_size == size:
            _skip(stream, size)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        digest = hashlib.sha256()
        remaining = size
        with tmp.open("wb") as out:
            while remaining:
                chunk = stream.read(min(CHUNK, remaining))
                if not chunk:
                    tmp.unlink()
                    raise VerificationError("bundle truncated inside a blob")
                digest.update(chunk)
                out.write(chunk)
                remaining -= len(chunk)
        if f"sha256:{digest.hexdigest()}" != blob_id:
            tmp.unlink()
            raise VerificationError(f"blob {blob_id[:19]}… in the bundle does not match its hash")
        tmp.chmod(0o644)
        tmp.replace(path)

    def add_root(self, env: dsse.Envelope) -> int:
        version = parse_unverified(env).version
        rel = rel_root(version)
        if not self.path(rel).exists():
            self._write(rel, env.to_bytes())
        return version

    def add_bundle(self, bundle_path: Path) -> tuple[str, manifest.Manifest]:
        """Explode a bundle into the repository; returns the manifest hash and content."""
        with bundle_path.open("rb") as f:
            header = bundle.read_header(f)
            parsed = manifest.parse(header.manifest.payload_json())
            for blob_id, size in parsed.blobs.items():
                self.add_blob(f, blob_id, size)
            bundle.expect_eof(f)
        sha = header.manifest.payload_sha256
        self._write(rel_manifest(sha), header.manifest.to_bytes())
        for env in header.roots:
            self.add_root(env)
        return sha, parsed

    def read_channel(self, name: str) -> dict[str, Any] | None:
        path = self.path(rel_channel(name))
        if not path.exists():
            return None
        env = dsse.from_bytes(path.read_bytes(), dsse.CHANNEL_TYPE)
        doc = env.payload_json()
        return doc if isinstance(doc, dict) else None

    def load_manifest(self, sha: str) -> manifest.Manifest:
        path = self.path(rel_manifest(sha))
        if not path.exists():
            raise UsageError(f"manifest {sha[:12]} is not in {self.root}")
        env = dsse.from_bytes(path.read_bytes(), dsse.MANIFEST_TYPE)
        return manifest.parse(env.payload_json())

    def sign_channel(
        self,
        name: str,
        keys: Sequence[SigningKey],
        *,
        manifest_sha: str | None,
        expires_in: dt.timedelta,
        percent: float | None = None,
        salt: str | None = None,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Write a new channel document (serial + 1). manifest_sha None: keep the target."""
        if not keys:
            raise UsageError("no channel key", "give --key")
        old = self.read_channel(name) or {}
        if manifest_sha is None:
            target = old.get("manifest")
            if not isinstance(target, dict):
                raise UsageError(f"channel {name} does not exist yet", "give --bundle")
            manifest_sha = str(target["sha256"])
        m = self.load_manifest(manifest_sha)
        size = self.path(rel_manifest(manifest_sha)).stat().st_size
        rollout = old.get("rollout")
        old_rollout: dict[str, Any] = rollout if isinstance(rollout, dict) else {}
        now = now or dt.datetime.now(dt.UTC)
        payload = {
            "type": CHANNEL_DOC_TYPE,
            "channel": name,
            "serial": int(old.get("serial", 0)) + 1,
            "issued": format_time(now),
            "expires": format_time(now + expires_in),
            "manifest": {
                "sha256": manifest_sha,
                "size": size,
                "counter": m.release.counter,
                "version": m.release.version,
            },
            "rollout": {
                "percent": percent if percent is not None else old_rollout.get("percent", 100),
                "salt": salt if salt is not None else old_rollout.get("salt", manifest_sha[:8]),
            },
        }
        env = dsse.new(dsse.CHANNEL_TYPE, payload)
        for key in keys:
            env.sign(key)
        self._write(rel_channel(name), env.to_bytes())
        return payload


def _skip(stream: BinaryIO, size: int) -> None:
    remaining = size
    while remaining:
        chunk = stream.read(min(CHUNK, remaining))
        if not chunk:
            raise VerificationError("bundle truncated inside a blob")
        remaining -= len(chunk)


def pack(repo: Repo, manifest_sha: str, out: Path) -> None:
    """The reverse of explode: a bundle from a repository's manifest, blobs and roots."""
    env = dsse.from_bytes(repo.path(rel_manifest(manifest_sha)).read_bytes(), dsse.MANIFEST_TYPE)
    parsed = manifest.parse(env.payload_json())
    roots_dir = repo.path("root")
    root_envs = (
        [
            dsse.from_bytes(p.read_bytes(), dsse.ROOT_TYPE)
            for p in sorted(roots_dir.glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]))
        ]
        if roots_dir.is_dir()
        else []
    )
    blob_paths = [repo.path(rel_blob(b)) for b in parsed.blobs]
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("wb") as f:
        bundle.write(f, env, root_envs, blob_paths)
    tmp.replace(out)


def describe(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, sort_keys=True)
