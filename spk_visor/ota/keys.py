"""Key files: writing a new key pair, and loading keys from disk (spk_visor.trust.keys
parses the bytes).

The private key file is 0600, created exclusively; one others can read is refused, as
OpenSSH does. Its passphrase may come from SPK_VISOR_OTA_PASSPHRASE.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from spk_visor import new_folder
from spk_visor.capped_read import read_at_most
from spk_visor.errors import ConfigError, UsageError
from spk_visor.trust.keys import (
    PASSPHRASE_ENV,
    PublicKey,
    SigningKey,
    parse_public_key,
    parse_signing_key,
    public_doc,
)

_MAX_KEY_FILE = 64 * 1024


def check_new_key(private_path: Path) -> Path:
    """Refuse a key path keygen must not write (a key there already, or a missing folder
    above the key's own); return the .pub path. Nothing is made."""
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise UsageError(f"{path} exists", "choose another name; keys are never overwritten")
    new_folder.check(private_path.parent, str(private_path))
    return public_path


def write_keypair(key: SigningKey, private_path: Path, passphrase: bytes | None) -> Path:
    """Write PRIVATE (0600, created exclusively) and PRIVATE.pub; return the .pub path."""
    public_path = check_new_key(private_path)
    pem = key.to_pem(passphrase)
    # A key folder is nobody else's business: 0700 (one that exists keeps its mode).
    new_folder.make(private_path.parent, str(private_path), 0o700)
    # O_EXCL + mode at creation: the private key is never readable by others, not even
    # for the instant a chmod after the write would leave open.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_text(json.dumps(public_doc(key.public), indent=1) + "\n")
    return public_path


def _read_capped(path: Path) -> bytes:
    try:
        data = read_at_most(path, _MAX_KEY_FILE)
    except FileNotFoundError as e:
        private = path.with_name(path.name.removesuffix(".pub"))
        raise ConfigError(
            f"cannot read key {path}: {e.strerror}",
            f"check the path, or make the key: spk-visor ota keygen {private}",
        ) from e
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
        raise ConfigError(
            f"cannot read key {path}: {e.strerror}",
            "check the path: give the private key file `spk-visor ota keygen` wrote"
            if isinstance(e, FileNotFoundError)
            else None,
        ) from e
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
    return parse_signing_key(data, passphrase, str(path))


def load_public_key(path: Path) -> PublicKey:
    """A .pub file written by keygen, or the private key file itself."""
    data = _read_capped(path)
    if data.lstrip().startswith(b"{"):
        return parse_public_key(data, str(path))
    return load_signing_key(path).public
