"""Signature envelopes (DSSE) and threshold checks.

{"payloadType": ..., "payload": <base64>, "signatures": [{"keyid": ..., "sig": <base64>}]}
Each signature is ed25519 over PAE(payloadType, payload). Distinct payload types for root,
channel and manifest give domain separation: a channel signature can never pass as a
manifest one. Signatures are checked over the raw payload bytes before any JSON in the
payload is parsed (verify, then parse).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spk_visor import strict_json
from spk_visor.errors import VerificationError

if TYPE_CHECKING:
    # Imported where keys are made: reading an envelope (`deploy send` reads the bundle's)
    # needs no key code, and cryptography's key serialization is ~9 ms of start-up.
    from spk_visor.trust.keys import PublicKey, SigningKey

ROOT_TYPE = "application/vnd.spk-visor-ota.root+json"
CHANNEL_TYPE = "application/vnd.spk-visor-ota.channel+json"
MANIFEST_TYPE = "application/vnd.spk-visor-ota.manifest+json"
MAX_SIGNATURES = 32
MAX_ENVELOPE = 1 << 20


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise VerificationError(f"signature envelope: {what} is not a string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise VerificationError(f"signature envelope: {what} is not valid base64") from e


@dataclass
class Envelope:
    payload_type: str
    payload: bytes
    signatures: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def payload_sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()

    def to_doc(self) -> dict[str, Any]:
        return {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode(),
            "signatures": [
                {"keyid": k, "sig": base64.b64encode(s).decode()} for k, s in self.signatures
            ],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_doc(), indent=1).encode() + b"\n"

    def sign(self, key: SigningKey) -> None:
        """Add (or replace) this key's signature."""
        self.signatures = [(k, s) for k, s in self.signatures if k != key.keyid]
        self.signatures.append((key.keyid, key.sign(pae(self.payload_type, self.payload))))

    def payload_json(self) -> Any:
        """The payload, parsed: call only after `verify` succeeded."""
        try:
            return strict_json.loads(self.payload)
        except ValueError as e:
            raise VerificationError(f"signed payload is not valid JSON: {e}") from e


def new(payload_type: str, payload_doc: Any) -> Envelope:
    payload = json.dumps(payload_doc, indent=1, sort_keys=True).encode()
    return Envelope(payload_type, payload)


def from_doc(doc: Any, expected_type: str) -> Envelope:
    """Structure check only: nothing here is trusted until `verify` passes."""
    if not isinstance(doc, dict):
        raise VerificationError("signature envelope is not a JSON object")
    if doc.get("payloadType") != expected_type:
        raise VerificationError(
            f"signature envelope has payload type {str(doc.get('payloadType'))[:80]!r}, "
            f"expected {expected_type}"
        )
    payload = _b64(doc.get("payload"), "payload")
    sigs = doc.get("signatures")
    if not isinstance(sigs, list):
        raise VerificationError("signature envelope: signatures is not a list")
    if len(sigs) > MAX_SIGNATURES:
        raise VerificationError(f"signature envelope has more than {MAX_SIGNATURES} signatures")
    parsed: list[tuple[str, bytes]] = []
    for entry in sigs:
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
            raise VerificationError("signature envelope: malformed signature entry")
        parsed.append((entry["keyid"], _b64(entry.get("sig"), "sig")))
    return Envelope(expected_type, payload, parsed)


def from_bytes(raw: bytes, expected_type: str) -> Envelope:
    if len(raw) > MAX_ENVELOPE:
        raise VerificationError(f"signature envelope larger than {MAX_ENVELOPE} bytes")
    try:
        doc = strict_json.loads(raw)
    except ValueError as e:
        raise VerificationError(f"signature envelope is not valid JSON: {e}") from e
    return from_doc(doc, expected_type)


@dataclass(frozen=True)
class Role:
    """A role of the root document: who may sign, and how many must."""

    name: str
    threshold: int
    keys: dict[str, PublicKey]

    def to_doc(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "keys": {k: v.hex for k, v in self.keys.items()}}

    @classmethod
    def from_doc(cls, name: str, doc: Any) -> Role:
        if not isinstance(doc, dict):
            raise VerificationError(f"root: role {name} is not an object")
        threshold = doc.get("threshold")
        keys = doc.get("keys")
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
            raise VerificationError(f"root: role {name} has no valid threshold")
        if not isinstance(keys, dict):
            raise VerificationError(f"root: role {name} has no keys")
        from spk_visor.trust.keys import PublicKey  # noqa: PLC0415 (see the top)

        parsed: dict[str, PublicKey] = {}
        for keyid, hexkey in keys.items():
            try:
                key = PublicKey.from_hex(hexkey)
            except (ValueError, TypeError) as e:
                raise VerificationError(f"root: role {name}: bad key {keyid[:12]}") from e
            if key.keyid != keyid:
                raise VerificationError(f"root: role {name}: key id {keyid[:12]} is not its hash")
            parsed[keyid] = key
        if threshold > len(parsed):
            raise VerificationError(
                f"root: role {name} needs {threshold} signatures but lists {len(parsed)} keys"
            )
        return cls(name, threshold, parsed)


def valid_signers(env: Envelope, role: Role) -> set[str]:
    """Distinct key ids of `role` with a good signature; unknown or bad ones are ignored."""
    message = pae(env.payload_type, env.payload)
    good: set[str] = set()
    for keyid, sig in env.signatures:
        key = role.keys.get(keyid)
        if key is not None and keyid not in good and key.verify(sig, message):
            good.add(keyid)
    return good


class SignatureError(VerificationError):
    """Too few valid signatures of the role (as opposed to a bad document)."""


def verify(env: Envelope, role: Role, what: str) -> set[str]:
    """SignatureError unless at least `role.threshold` distinct keys of the role signed."""
    good = valid_signers(env, role)
    if len(good) < role.threshold:
        raise SignatureError(
            f"{what}: {len(good)} valid {role.name} signature(s), {role.threshold} required",
            "signed with a wrong, revoked or other-role key, or the content was changed",
        )
    return good
