"""The verification policy, the same for push, pull and deploy (ota.md, "Verification
policy").

In order: the clock, the root chain (spk_visor.trust.roots; the caller owns the
transport), the channel (pull), the manifest's hash and signatures, compatibility, the
counter floor, and each blob's hash. Each step raises with the reason. Everything here is
a function of its arguments: the reference time, the node's platform and the agent's
version are passed in (spk_visor.ota.verify binds them to this host, with free space).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

from spk_visor.errors import TransportError, VerificationError
from spk_visor.trust import dsse, manifest
from spk_visor.trust.roots import Root, check_expiry, format_time, parse_time

CHANNEL_DOC_TYPE = "spk-visor-ota.channel/v1"
CLOCK_SLACK = dt.timedelta(minutes=5)


def check_clock(start: dt.datetime, clock_floor: str, assume_time: bool) -> None:
    """Refuse when the clock is behind the newest signed time this node has seen."""
    if not clock_floor or assume_time:
        return
    floor = parse_time(clock_floor, "clock floor")
    if start < floor - CLOCK_SLACK:
        raise TransportError(
            f"the clock ({format_time(start)}) is behind a signed time already seen "
            f"({clock_floor})",
            "fix the clock (NTP); in push mode --assume-time overrides",
        )


@dataclass(frozen=True)
class Channel:
    name: str
    serial: int
    issued: str
    expires: dt.datetime
    manifest_sha256: str
    manifest_size: int
    counter: int
    version: str
    percent: float
    salt: str
    signers: frozenset[str]
    raw_payload: bytes


def verify_channel(
    env: dsse.Envelope,
    root: Root,
    *,
    name: str,
    start: dt.datetime,
    stored: dict[str, Any] | None,
) -> tuple[Channel, bool]:
    """Verify a channel document; return it and whether it is the one already seen."""
    signers = dsse.verify(env, root.role("channel"), f"channel {name}")
    doc = env.payload_json()
    if not isinstance(doc, dict) or doc.get("type") != CHANNEL_DOC_TYPE:
        raise VerificationError(f"channel: type is not {CHANNEL_DOC_TYPE}")
    if doc.get("channel") != name:
        raise VerificationError(f"channel document is for {doc.get('channel')!r}, not {name!r}")
    serial = doc.get("serial")
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 1:
        raise VerificationError("channel: serial must be an integer >= 1")
    target = doc.get("manifest")
    if not isinstance(target, dict) or not isinstance(target.get("sha256"), str):
        raise VerificationError("channel: manifest pointer missing")
    rollout = _field(doc, "rollout", dict, {})
    percent = _field(rollout, "percent", int | float, 100, "rollout.")
    if not 0 <= percent <= 100:
        raise VerificationError("channel: rollout.percent must be within 0..100")
    channel = Channel(
        name=name,
        serial=serial,
        issued=_field(doc, "issued", str, ""),
        expires=parse_time(doc.get("expires"), "channel expires"),
        manifest_sha256=target["sha256"],
        manifest_size=_count(target, "size"),
        counter=_count(target, "counter"),
        version=_field(target, "version", str, "", "manifest."),
        percent=float(percent),
        salt=_field(rollout, "salt", str, "", "rollout."),
        signers=frozenset(signers),
        raw_payload=env.payload,
    )
    unchanged = False
    if stored:
        # A new channel key set means a rotated channel role: start its serial afresh
        # (TUF's fast-forward recovery), else a stolen key's huge serial would lock us out.
        same_keys = set(stored.get("keyids", [])) == root.keyids("channel")
        seen = int(stored.get("serial", 0))
        if same_keys and serial < seen:
            raise TransportError(
                f"channel {name}: serial {serial} is older than {seen} already seen "
                "(a stale mirror or CDN edge, or a replay)",
                "try again later; nothing was changed",
            )
        if same_keys and serial == seen:
            if stored.get("payload_sha256") not in (None, env.payload_sha256):
                raise VerificationError(
                    f"channel {name}: serial {serial} re-used for a different document"
                )
            unchanged = True
    if channel.expires <= start:
        raise VerificationError(
            f"channel {name} expired at {format_time(channel.expires)}",
            "the channel is frozen or the repository stopped re-signing it; check the clock",
        )
    return channel, unchanged


def _field(doc: dict[str, Any], key: str, kind: Any, default: Any, where: str = "") -> Any:
    """An optional signed field of exactly `kind` (never a bool for a number)."""
    value = doc.get(key, default)
    if value is None and default is not None:
        value = default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise VerificationError(f"channel: {where}{key} is of the wrong type")
    return value


def _count(target: dict[str, Any], key: str) -> int:
    value = _field(target, key, int, 0, "manifest.")
    if value < 0:
        raise VerificationError(f"channel: manifest.{key} must be >= 0")
    return int(value)


@dataclass
class Verified:
    manifest: manifest.Manifest
    sha256: str
    signers: frozenset[str]
    envelope: dsse.Envelope
    downgrade: bool = False
    notes: list[str] = field(default_factory=list)


def verify_manifest(
    env: dsse.Envelope,
    root: Root,
    *,
    start: dt.datetime,
    node: str,
    agent_version: str,
    channel: Channel | None = None,
) -> Verified:
    """Signatures (over raw bytes first), then schema, then compatibility with `node`
    (e.g. "smechvisor/x86_64") and an agent of `agent_version`, at time `start`."""
    check_expiry(root, start)
    if channel is not None and env.payload_sha256 != channel.manifest_sha256:
        raise VerificationError(
            "manifest does not match the hash its channel points to",
            "the mirror serves a different manifest; nothing was changed",
        )
    signers = dsse.verify(env, root.role("release"), "manifest")
    parsed = manifest.parse(env.payload_json())
    if parsed.product != root.product:
        raise VerificationError(f"manifest is for product {parsed.product!r}")
    if node not in parsed.compatible:
        raise VerificationError(
            f"manifest is not compatible with this node ({node})",
            f"it lists {', '.join(parsed.compatible) or 'nothing'}",
        )
    if parsed.dev and not root.dev:
        raise VerificationError("a development release cannot install under a production root")
    if manifest.version_tuple(parsed.agent_min) > manifest.version_tuple(agent_version):
        raise VerificationError(
            f"the release needs spk-visor {parsed.agent_min} or later (this is {agent_version})",
            "update the agent first",
        )
    unknown = set(parsed.features) - manifest.FEATURES
    if unknown:
        raise VerificationError(
            f"the release requires unknown features: {', '.join(sorted(unknown))}",
            "update the agent first",
        )
    return Verified(parsed, env.payload_sha256, frozenset(signers), env)


def check_counter(
    verified: Verified,
    *,
    floor: int,
    installed: int,
    mode: str,
    allow_downgrade: bool,
    allow_channel_revert: bool,
) -> None:
    """Anti-rollback: never below the floor; below what is installed only when allowed."""
    counter = verified.manifest.release.counter
    if counter < floor:
        raise VerificationError(
            f"release counter {counter} is below this node's floor {floor}",
            "an older release cannot be installed once a newer one raised the floor",
        )
    if counter < installed:
        if mode == "push" and not allow_downgrade:
            raise VerificationError(
                f"release counter {counter} is older than the installed {installed}",
                "pass --allow-downgrade to install an older release on purpose",
            )
        if mode == "pull" and not allow_channel_revert:
            raise VerificationError(
                f"the channel points to counter {counter}, older than the installed {installed}",
                "allow_channel_revert is off in ota.conf",
            )
        verified.downgrade = True
        verified.notes.append(f"downgrade from counter {installed} to {counter}")


def require_blob_hash(blob_id: str, actual_hex: str) -> None:
    """A blob's sha256 must be the one its id (from the signed manifest) names."""
    if actual_hex != blob_id.split(":", 1)[1]:
        raise VerificationError(
            f"blob {blob_id[:19]}… does not match its signed hash (got {actual_hex[:12]}…)",
            "the bundle or the download is corrupt or tampered with; nothing was changed",
        )


class BlobCheck:
    """One blob checked as it streams: never more than its signed size, and at the end
    exactly that size and its signed hash. Feed it with `update`, then call `finish`."""

    def __init__(self, blob_id: str, size: int) -> None:
        self.blob_id = blob_id
        self.size = size
        self.received = 0
        self._digest = hashlib.sha256()

    @property
    def remaining(self) -> int:
        return self.size - self.received

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > self.remaining:
            raise VerificationError(
                f"blob {self.blob_id[:19]}… is longer than its signed size {self.size}",
                "the bundle or the download is corrupt or tampered with; nothing was changed",
            )
        self._digest.update(data)
        self.received += len(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def finish(self) -> None:
        """Refuse unless the whole blob arrived and has its signed hash."""
        if self.remaining:
            raise VerificationError(
                f"blob {self.blob_id[:19]}… is {self.remaining} bytes short of its signed size",
                "copy the bundle again",
            )
        require_blob_hash(self.blob_id, self.hexdigest())
