"""The deploy code `NN-SSSSS` (design/deploy.md, "The code").

The nameplate `NN` is public: it is broadcast and only picks the target. The secret
`SSSSS` (Crockford base32, about 25 bits) never leaves either machine; it is only ever
the SPAKE2 password, so nothing here hashes or encodes it for anyone else.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
SECRET_LEN = 5
NAMEPLATE_DIGITS = (2, 3, 4)

# What every malformed code's message ends with: the form the operator should type.
EXPECTED_FORM = "type it as shown on the target's screen, in the form NN-XXXXX (e.g. 42-K7QX9)"

# Crockford's reading aids: what a person may type for a symbol that looks alike.
# U is excluded from the alphabet (accidental obscenity) and is not mapped to anything.
_ALIASES = {"O": "0", "I": "1", "L": "1"}
# Domain separation: this password is only ever fed to SPAKE2 for deploy v1.
_PASSWORD_LABEL = b"spk-deploy/v1/code"


@dataclass(frozen=True)
class Code:
    """One displayed code. `epoch` counts rotations; it is public and goes into the password
    so an old secret cannot be replayed against a rotated code."""

    nameplate: str
    secret: str
    epoch: int

    def __str__(self) -> str:
        return f"{self.nameplate}-{self.secret}"

    def password(self) -> bytes:
        return password(self.nameplate, self.secret, self.epoch)


def new_code(nameplate: str | None = None, digits: int = 2, epoch: int = 0) -> Code:
    """A fresh code from the OS CSPRNG; keep `nameplate` across rotations (it is public)."""
    if digits not in NAMEPLATE_DIGITS:
        raise ValueError(f"nameplate digits must be one of {NAMEPLATE_DIGITS}, not {digits}")
    if nameplate is None:
        nameplate = f"{secrets.randbelow(10**digits):0{digits}d}"
    else:
        nameplate = _check_nameplate(nameplate)
    if epoch < 0:
        raise ValueError(f"code epoch must be >= 0, not {epoch}")
    secret = "".join(secrets.choice(CROCKFORD) for _ in range(SECRET_LEN))
    return Code(nameplate, secret, epoch)


def parse(text: str) -> tuple[str, str]:
    """`"42-k7qx9"` -> `("42", "K7QX9")`: the nameplate and the normalised secret.

    Accepts any case, surrounding blanks, O for 0 and I/L for 1; rejects anything else
    with a message that says what is wrong (the operator typed it)."""
    cleaned = text.strip()
    nameplate, sep, secret = cleaned.partition("-")
    if not sep:
        raise ValueError(f"code {cleaned!r} has no '-'; {EXPECTED_FORM}")
    try:
        return _check_nameplate(nameplate.strip()), normalise_secret(secret.strip())
    except ValueError as e:
        raise ValueError(f"code {cleaned!r}: {e}; {EXPECTED_FORM}") from None


def normalise_secret(secret: str) -> str:
    """The canonical form of the secret part, or ValueError."""
    out = []
    for typed in secret.upper():
        ch = _ALIASES.get(typed, typed)
        if ch not in CROCKFORD:
            if ch == "U":
                raise ValueError("the secret part never contains U (Crockford base32)")
            raise ValueError(
                f"the secret part may contain only 0-9 and A-Z without I, L, O, U; got {ch!r}"
            )
        out.append(ch)
    if len(out) != SECRET_LEN:
        raise ValueError(f"the secret part has {SECRET_LEN} symbols, got {len(out)}")
    return "".join(out)


def password(nameplate: str, secret: str, epoch: int) -> bytes:
    """The SPAKE2 password: label, normalised full code and epoch.

    Normalising here too means both sides agree whatever form the caller held."""
    if epoch < 0:
        raise ValueError(f"code epoch must be >= 0, not {epoch}")
    full = f"{_check_nameplate(nameplate)}-{normalise_secret(secret)}"
    return b"%s:%s:%d" % (_PASSWORD_LABEL, full.encode("ascii"), epoch)


def _check_nameplate(nameplate: str) -> str:
    if not (nameplate.isascii() and nameplate.isdigit() and len(nameplate) in NAMEPLATE_DIGITS):
        raise ValueError(f"the nameplate is 2-4 decimal digits, got {nameplate!r}")
    return nameplate
