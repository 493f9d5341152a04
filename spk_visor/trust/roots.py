"""Root documents: which keys may sign what, and how trust moves forward.

Root v(N+1) is accepted only when signed by the threshold of v(N) *and* of v(N+1), and its
version is exactly N+1 (TUF 5.3). Trust never moves backwards. Revoking a key is
publishing a root without it. Where roots are kept on a node is spk_visor.ota.roots.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from spk_visor.errors import VerificationError
from spk_visor.trust import dsse
from spk_visor.trust.keys import PublicKey

ROOT_DOC_TYPE = "spk-visor-ota.root/v1"
ROLES = ("root", "release", "channel")
MAX_ROOT_WALK = 32
MAX_ROOT_BYTES = 512 * 1024


def parse_time(text: Any, what: str) -> dt.datetime:
    if not isinstance(text, str):
        raise VerificationError(f"{what} is missing")
    try:
        value = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError as e:
        raise VerificationError(f"{what} {text!r} is not YYYY-MM-DDTHH:MM:SSZ") from e
    return value.replace(tzinfo=dt.UTC)


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Root:
    version: int
    expires: dt.datetime
    product: str
    dev: bool
    roles: dict[str, dsse.Role]
    envelope: dsse.Envelope

    def role(self, name: str) -> dsse.Role:
        return self.roles[name]

    def keyids(self, role: str) -> set[str]:
        return set(self.roles[role].keys)


def payload(
    version: int,
    expires: dt.datetime,
    roles: dict[str, tuple[int, list[PublicKey]]],
    *,
    product: str = "smechvisor",
    dev: bool = False,
) -> dict[str, Any]:
    return {
        "type": ROOT_DOC_TYPE,
        "version": version,
        "expires": format_time(expires),
        "product": product,
        "dev": dev,
        "roles": {
            name: {"threshold": t, "keys": {k.keyid: k.hex for k in keys}}
            for name, (t, keys) in roles.items()
        },
    }


def parse_unverified(env: dsse.Envelope) -> Root:
    """The root's content; its signatures still have to be checked by the caller."""
    doc = env.payload_json()
    if not isinstance(doc, dict) or doc.get("type") != ROOT_DOC_TYPE:
        raise VerificationError(f"root: type is not {ROOT_DOC_TYPE}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise VerificationError("root: version must be an integer >= 1")
    roles_doc = doc.get("roles")
    if not isinstance(roles_doc, dict):
        raise VerificationError("root: roles missing")
    roles = {}
    for name in ROLES:
        roles[name] = dsse.Role.from_doc(name, roles_doc.get(name))
    return Root(
        version=version,
        expires=parse_time(doc.get("expires"), "root expires"),
        product=_typed(doc, "product", str, "smechvisor"),
        dev=_typed(doc, "dev", bool, False),
        roles=roles,
        envelope=env,
    )


def _typed(doc: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = doc.get(key, default)
    if not isinstance(value, kind):
        raise VerificationError(f"root: {key} must be of type {kind.__name__}")
    return value


def load_anchor(raw: bytes, what: str) -> Root:
    """A root trusted by where it came from (the factory copy, the node's own store).

    It must still verify under its own root role: a corrupted anchor is refused.
    """
    root = parse_unverified(dsse.from_bytes(raw, dsse.ROOT_TYPE))
    dsse.verify(root.envelope, root.role("root"), what)
    return root


def verify_successor(current: Root, env: dsse.Envelope) -> Root:
    """Root v(N+1) checked against v(N) and itself."""
    dsse.verify(env, current.role("root"), f"root v{current.version + 1} (old keys)")
    new = parse_unverified(env)
    dsse.verify(env, new.role("root"), f"root v{new.version} (new keys)")
    if new.version != current.version + 1:
        raise VerificationError(
            f"root version {new.version} does not follow {current.version}",
            "root versions must increase by exactly one",
        )
    return new


def verify_next(current: Root, raw: bytes) -> Root:
    """Root v(N+1) as raw bytes (size-capped before parsing), checked against v(N)."""
    if len(raw) > MAX_ROOT_BYTES:
        raise VerificationError(f"root v{current.version + 1} is larger than allowed")
    return verify_successor(current, dsse.from_bytes(raw, dsse.ROOT_TYPE))


def newest_anchor(anchors: list[tuple[bytes, str]]) -> Root | None:
    """The newest of several anchor copies (raw bytes, name): each must verify."""
    best: Root | None = None
    for raw, what in anchors:
        root = load_anchor(raw, what)
        if best is None or root.version > best.version:
            best = root
    return best


def check_expiry(root: Root, now: dt.datetime) -> None:
    if root.expires <= now:
        raise VerificationError(
            f"the trusted root (v{root.version}) expired at {format_time(root.expires)}",
            "publish a newer root (spk-visor ota root rotate) or check the node's clock",
        )


def chain_from_list(start: Root, envelopes: list[dsse.Envelope]) -> tuple[Root, list[Root]]:
    """Apply the roots a bundle carries (offline rotation), in version order, from `start`."""
    by_version: dict[int, dsse.Envelope] = {}
    for env in envelopes[:MAX_ROOT_WALK]:
        by_version[parse_unverified(env).version] = env
    current, added = start, []
    while current.version + 1 in by_version:
        current = verify_successor(current, by_version[current.version + 1])
        added.append(current)
    return current, added
