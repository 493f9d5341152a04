"""Signed OTA documents built wholly in memory, at a fixed reference time, for the tests
of spk_visor.trust: keys, a root, a release manifest with its pack, and a channel.

Nothing here reads a file or the clock, so the trust package can be driven through it
with both forbidden (tests/unit/test_trust_pure.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

from spk_visor.trust import dsse, keys, manifest, roots, verify

# The reference time every document is dated against (not the machine's clock).
REF = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
NODE = "smechvisor/x86_64"
AGENT = "1.0.0"


@dataclass
class World:
    root_keys: list[keys.SigningKey] = field(default_factory=lambda: [keys.generate()])
    release_keys: list[keys.SigningKey] = field(default_factory=lambda: [keys.generate()])
    channel_keys: list[keys.SigningKey] = field(default_factory=lambda: [keys.generate()])
    root_expires: dt.datetime = REF + dt.timedelta(days=365)

    def root_env(
        self, version: int = 1, *, signers: list[keys.SigningKey] | None = None
    ) -> dsse.Envelope:
        payload = roots.payload(
            version,
            self.root_expires,
            {
                "root": (1, [k.public for k in self.root_keys]),
                "release": (1, [k.public for k in self.release_keys]),
                "channel": (1, [k.public for k in self.channel_keys]),
            },
            dev=True,
        )
        env = dsse.new(dsse.ROOT_TYPE, payload)
        for key in self.root_keys if signers is None else signers:
            env.sign(key)
        return env

    def root(self) -> roots.Root:
        return roots.load_anchor(self.root_env().to_bytes(), "test root")

    def manifest_env(self, payload: dict[str, Any]) -> dsse.Envelope:
        env = dsse.new(dsse.MANIFEST_TYPE, payload)
        for key in self.release_keys:
            env.sign(key)
        return env

    def channel_env(
        self, manifest_env: dsse.Envelope, *, serial: int = 1, expires: dt.datetime | None = None
    ) -> dsse.Envelope:
        payload = {
            "type": verify.CHANNEL_DOC_TYPE,
            "channel": "stable",
            "serial": serial,
            "issued": roots.format_time(REF),
            "expires": roots.format_time(expires or REF + dt.timedelta(days=7)),
            "manifest": {"sha256": manifest_env.payload_sha256, "size": 0, "counter": 1},
        }
        env = dsse.new(dsse.CHANNEL_TYPE, payload)
        for key in self.channel_keys:
            env.sign(key)
        return env


def release(files: dict[str, bytes], counter: int = 1) -> tuple[dict[str, Any], bytes]:
    """(manifest payload, pack) of a daemon release made of `files` (path -> content)."""
    pack = b"".join(files.values())
    pack_id = f"sha256:{hashlib.sha256(pack).hexdigest()}"
    entries = [
        {"p": p, "m": 0o644, "s": len(data), "h": hashlib.sha256(data).hexdigest()}
        for p, data in files.items()
    ]
    payload = {
        "type": manifest.MANIFEST_TYPE,
        "product": manifest.PRODUCT,
        "compatible": [NODE],
        "dev": True,
        "created": roots.format_time(REF),
        "release": {"version": f"1.{counter}", "counter": counter},
        "components": {
            "smechvisord": {
                "class": "daemon",
                "version": f"1.{counter}",
                "service": "smechvisord",
                "tree": {"pack": pack_id, "files": entries},
                "health": {},
            }
        },
        "blobs": [{"id": pack_id, "size": len(pack)}],
    }
    return payload, pack
