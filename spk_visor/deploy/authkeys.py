"""The admin's SSH public keys that deploy writes to a new node (docs/deploy.md).

The same strict check runs twice: on the donor before it contacts anyone, and on the
target when the PLAN arrives. Only plain OpenSSH public key lines pass: `type base64
[comment]`, the blob decoding to a key of the named type. Option prefixes (`command=`,
`from=`, `environment=` ...) are refused rather than passed through: the keys travel
inside a deploy, and a line that runs a forced command or opens a tunnel should be
something the admin writes on the node, not something a donor slips in.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct

# authorized_keys lines for a handful of admins; far below anything the channel carries.
MAX_BYTES = 16 << 10
MAX_KEYS = 32
MAX_COMMENT = 256
KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# A comment is printable ASCII: it lands in a file sshd parses line by line.
_COMMENT = re.compile(r"[\x20-\x7e]*")


def validate(text: str) -> str:
    """The keys normalised to `type blob [comment]\\n` lines, or ValueError saying why.

    Blank lines and `#` comment lines are dropped; at least one key must remain."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ValueError(f"more than {MAX_BYTES} bytes of keys")
    keys: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(_key_line(line))
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from e
        if len(keys) > MAX_KEYS:
            raise ValueError(f"more than {MAX_KEYS} keys")
    if not keys:
        raise ValueError("no public key in it (expected lines like `ssh-ed25519 AAAA... me@host`)")
    return "".join(f"{k}\n" for k in keys)


def _key_line(line: str) -> str:
    parts = line.split(None, 2)
    kind = parts[0]
    if kind not in KEY_TYPES:
        if "=" in kind or "," in kind or '"' in kind:
            raise ValueError("options before the key (command=, from=, ...) are not accepted")
        if kind.startswith("-----") or kind.startswith("PuTTY"):
            raise ValueError("this is not an OpenSSH public key (a private key or another format?)")
        raise ValueError(f"unknown key type {kind[:40]!r}")
    if len(parts) < 2:
        raise ValueError(f"{kind} without its key")
    blob = parts[1]
    if not _B64.fullmatch(blob):
        raise ValueError("the key is not base64")
    try:
        decoded = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("the key is not base64") from e
    if _embedded_type(decoded) != kind:
        raise ValueError(f"the key's blob does not hold a {kind} key")
    comment = parts[2].strip() if len(parts) > 2 else ""
    if len(comment) > MAX_COMMENT or not _COMMENT.fullmatch(comment):
        raise ValueError(f"the comment must be printable ASCII, at most {MAX_COMMENT} characters")
    return f"{kind} {blob} {comment}" if comment else f"{kind} {blob}"


def _embedded_type(blob: bytes) -> str | None:
    """The type string at the head of an SSH wire-format public key."""
    if len(blob) < 4:
        return None
    (n,) = struct.unpack(">I", blob[:4])
    if n > 64 or len(blob) < 4 + n + 4:  # the type, then at least one more field
        return None
    try:
        return blob[4 : 4 + n].decode("ascii")
    except UnicodeDecodeError:
        return None
