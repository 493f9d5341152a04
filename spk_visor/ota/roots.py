"""The node's trust store: the factory root, the newest verified root and its history.

```
<factory>                    read-only anchor in the base image
<trust_dir>/root.json        newest verified root (never decreases)
<trust_dir>/<N>.root.json    chain history (audit)
```
Reading and writing these files is all this module does; whether a root may be trusted
is decided by spk_visor.trust.roots over the bytes. `load_file` and `document` are the
one way any command reads a root file (the node's store, the shim's baked-in anchor, a
--root or --trust-root the operator named), so each problem is said one way everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spk_visor.errors import ConfigError, VerificationError
from spk_visor.ota import durable
from spk_visor.trust import dsse
from spk_visor.trust.roots import (
    MAX_ROOT_BYTES,
    MAX_ROOT_WALK,
    Root,
    load_anchor,
    parse_unverified,
    verify_next,
)

NOT_A_ROOT_HINT = "give a root.json written by `spk-visor ota root init` or `ota root rotate`"


def read_bytes(path: Path, what: str, hint: str | None = None) -> bytes:
    """A root file's bytes (at most MAX_ROOT_BYTES + 1: a longer one fails to parse)."""
    try:
        with path.open("rb") as f:
            return f.read(MAX_ROOT_BYTES + 1)
    except OSError as e:
        raise ConfigError(
            f"cannot read the {what} {path}: {e.strerror or e}", hint or "check the path"
        ) from e


def _envelope(raw: bytes, path: Path) -> dsse.Envelope:
    """Not even a signed root envelope (junk, a key file, another kind of document):
    whoever named the file made a mistake (exit 2), said with its name."""
    try:
        return dsse.from_bytes(raw, dsse.ROOT_TYPE)
    except VerificationError as e:
        raise ConfigError(f"{path} is not a root document ({e.message})", NOT_A_ROOT_HINT) from e


@contextlib.contextmanager
def _refusing(path: Path, what: str) -> Iterator[None]:
    """A root envelope whose content or signatures do not hold: refused (exit 3)."""
    try:
        yield
    except VerificationError as e:
        raise VerificationError(f"{what} {path} refused: {e.message}", e.hint) from e


def document(path: Path, what: str = "root document") -> dsse.Envelope:
    """A file that must hold a root document, signatures not checked (to sign, rotate,
    publish or compare it)."""
    env = _envelope(read_bytes(path, what), path)
    with _refusing(path, what):
        parse_unverified(env)
    return env


def load_file(path: Path, what: str = "trust root", hint: str | None = None) -> tuple[Root, bytes]:
    """A root trusted for where it came from (trust.roots.load_anchor): read, a root
    document, and valid under its own root role. Returns the root and its bytes.
    `hint` says where the file should come from when it cannot be read."""
    raw = read_bytes(path, what, hint)
    _envelope(raw, path)
    with _refusing(path, what):
        return load_anchor(raw, "self-signature"), raw


@dataclass
class TrustStore:
    """The node's roots: the factory anchor and the newest verified copy."""

    factory: Path
    trust_dir: Path

    @property
    def newest_path(self) -> Path:
        return self.trust_dir / "root.json"

    def load(self) -> Root:
        """The newer of the two copies (each must verify)."""
        best: Root | None = None
        for path in (self.newest_path, self.factory):
            if not path.exists():
                continue
            root, _raw = load_file(path)
            if best is None or root.version > best.version:
                best = root
        if best is None:
            raise VerificationError(
                f"no trust root: neither {self.factory} nor {self.newest_path} exists",
                "install the product's root.json (spk-visor ota root init makes one)",
            )
        return best

    def save(self, root: Root) -> None:
        self.trust_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        raw = root.envelope.to_bytes()
        durable.write_bytes(self.trust_dir / f"{root.version}.root.json", raw, 0o644)
        durable.write_bytes(self.newest_path, raw, 0o644)

    def update(
        self, fetch_next: Callable[[int], bytes | None], *, persist: bool = True
    ) -> tuple[Root, list[Root]]:
        """Walk root v(N+1), v(N+2), ... from `fetch_next(version)` until it gives None.

        Returns the newest root and the new ones seen; with `persist`, each verified one
        is saved before the next is tried (trust moves forward even if a later step fails).
        """
        current = self.load()
        added: list[Root] = []
        for _ in range(MAX_ROOT_WALK):
            raw = fetch_next(current.version + 1)
            if raw is None:
                break
            current = verify_next(current, raw)
            added.append(current)
            if persist:
                self.save(current)
        return current, added
