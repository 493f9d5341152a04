"""ed25519 signing keys: generation, key files, key ids.

Private key: PKCS#8 PEM, mode 0600, optionally encrypted with a passphrase. Public key: a
small JSON file `{"keytype": "ed25519", "keyid": ..., "public": <hex of the raw 32 bytes>}`.
The key id is sha256 of the raw public key, so it names the key, not a file or a label.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from spk_visor.errors import ConfigError, UsageError

PASSPHRASE_ENV = "SPK_VISOR_OTA_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
_MAX_KEY_FILE = 64 * 1024


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


def generate() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def public_doc(key: PublicKey) -> dict[str, str]:
    return {"keytype": "ed25519", "keyid": key.keyid, "public": key.hex}


def write_keypair(key: SigningKey, private_path: Path, passphrase: bytes | None) -> Path:
    """Write PRIVATE (0600, created exclusively) and PRIVATE.pub; return the .pub path."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise UsageError(f"{path} exists", "choose another name; keys are never overwritten")
    make_private_folders(private_path.parent)
    # O_EXCL + mode at creation: the private key is never readable by others, not even
    # for the instant a chmod after the write would leave open.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_text(json.dumps(public_doc(key.public), indent=1) + "\n")
    return public_path


def make_private_folders(folder: Path) -> None:
    """Create `folder` and its missing parents, each 0700: a key folder is nobody
    else's business. Folders that exist keep their mode."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700)
        path.chmod(0o700)  # whatever the umask


def _read_capped(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read key {path}: {e.strerror}") from e
    if len(data) > _MAX_KEY_FILE:
        raise ConfigError(f"{path} is too large to be a key file")
    return data


def load_signing_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Load a private key; refuse one others can read, as OpenSSH does."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"cannot read key {path}: {e.strerror}") from e
    if stat.S_ISDIR(mode):
        raise ConfigError(
            f"{path} is a folder, not a private key",
            "give the private key file written by `spk-visor ota keygen` (not its .pub)",
        )
    if path.name.endswith(".pub") and _read_capped(path).lstrip().startswith(b"{"):
        # Signing takes the private half; chmod would not make a public key sign.
        private_path = path.with_name(path.name[:-4])
        raise ConfigError(
            f"{path} is a public key; signing needs the private key",
            f"--key {private_path}"
            if private_path.exists()
            else "give the key file keygen wrote it with",
        )
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):o})",
            f"chmod 600 {path}",
        )
    data = _read_capped(path)
    if passphrase is None and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    try:
        private = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as e:
        hint = f"give the passphrase ({PASSPHRASE_ENV} or --passphrase-file)"
        if passphrase:
            hint = "this key is not encrypted: drop the passphrase"
        raise ConfigError(f"{path}: {e}", hint) from e
    except ValueError as e:
        raise ConfigError(f"{path}: not a usable private key (or a wrong passphrase)") from e
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an ed25519 key")
    return SigningKey(private)


def load_public_key(path: Path) -> PublicKey:
    """A .pub file written by keygen, or the private key file itself."""
    data = _read_capped(path)
    if data.lstrip().startswith(b"{"):
        try:
            doc = json.loads(data)
            key = PublicKey.from_hex(doc["public"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a spk-visor public key file") from e
        if doc.get("keyid") not in (None, key.keyid):
            raise ConfigError(f"{path}: the keyid does not match the key")
        return key
    return load_signing_key(path).public
