"""ed25519 keys: key ids, signing, and parsing key material from bytes.

Private key: PKCS#8 PEM, optionally encrypted with a passphrase. Public key: a small JSON
document `{"keytype": "ed25519", "keyid": ..., "public": <hex of the raw 32 bytes>}`.
The key id is sha256 of the raw public key, so it names the key, not a file or a label.
Reading and writing key files (modes, passphrase from the environment) is
spk_visor.ota.keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from spk_visor.errors import ConfigError

PASSPHRASE_ENV = "SPK_VISOR_OTA_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)


def keyid_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @property
    def keyid(self) -> str:
        return keyid_of(self.raw)

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        raw = bytes.fromhex(text)
        if len(raw) != 32:
            raise ValueError("an ed25519 public key is 32 bytes")
        return cls(raw)


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        return PublicKey(
            self.private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def to_pem(self, passphrase: bytes | None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )


def generate() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def public_doc(key: PublicKey) -> dict[str, str]:
    return {"keytype": "ed25519", "keyid": key.keyid, "public": key.hex}


def parse_signing_key(data: bytes, passphrase: bytes | None, what: str) -> SigningKey:
    """A PKCS#8 PEM ed25519 private key; ConfigError naming `what` otherwise."""
    try:
        private = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as e:
        hint = f"give the passphrase ({PASSPHRASE_ENV} or --passphrase-file)"
        if passphrase:
            hint = "this key is not encrypted: drop the passphrase"
        raise ConfigError(f"{what}: {e}", hint) from e
    except ValueError as e:
        raise ConfigError(f"{what}: not a usable private key (or a wrong passphrase)") from e
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{what} is not an ed25519 key")
    return SigningKey(private)


def parse_public_key(data: bytes, what: str) -> PublicKey:
    """A public key document (see above), or an unencrypted private key's public half."""
    if data.lstrip().startswith(b"{"):
        try:
            doc = json.loads(data)
            key = PublicKey.from_hex(doc["public"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{what}: not a spk-visor public key file") from e
        if doc.get("keyid") not in (None, key.keyid):
            raise ConfigError(f"{what}: the keyid does not match the key")
        return key
    return parse_signing_key(data, None, what).public
