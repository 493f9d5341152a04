"""The node's trust store: the factory root, the newest verified root and its history.

```
<factory>                    read-only anchor in the base image
<trust_dir>/root.json        newest verified root (never decreases)
<trust_dir>/<N>.root.json    chain history (audit)
```
Reading and writing these files is all this module does; whether a root may be trusted
is decided by spk_visor.trust.roots over the bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spk_visor.errors import OperatorNeededError, VerificationError
from spk_visor.ota import durable
from spk_visor.trust.roots import MAX_ROOT_BYTES, MAX_ROOT_WALK, Root, newest_anchor, verify_next


@dataclass
class TrustStore:
    """The node's roots: the factory anchor and the newest verified copy."""

    factory: Path
    trust_dir: Path

    @property
    def newest_path(self) -> Path:
        return self.trust_dir / "root.json"

    def load(self) -> Root:
        anchors: list[tuple[bytes, str]] = []
        for path in (self.newest_path, self.factory):
            try:
                with path.open("rb") as f:
                    anchors.append((f.read(MAX_ROOT_BYTES + 1), f"trust root {path}"))
            except FileNotFoundError:
                continue
            except OSError as e:
                raise OperatorNeededError(f"cannot read trust root {path}: {e.strerror}") from e
        best = newest_anchor(anchors)
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
