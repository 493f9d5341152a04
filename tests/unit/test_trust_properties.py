"""Property tests of spk_visor.trust: what is signed and serialised parses back to the
same thing and verifies, and any change to a signed byte, a signature or a blob is
refused. (tests/hostile/test_fuzz_parsers.py feeds the same parsers garbage; this file
checks that honest documents survive and that tampering with them never does.)
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spk_visor.errors import ConfigError, VerificationError
from spk_visor.trust import dsse, keys, manifest, roots, verify
from tests.support.trust_world import AGENT, NODE, REF, World, release

pytestmark = pytest.mark.fuzz

# Keys are made once: hypothesis runs each body many times, and which key signs is
# what varies, not the key material.
KEYS = [keys.generate() for _ in range(4)]
TYPES = [dsse.ROOT_TYPE, dsse.CHANNEL_TYPE, dsse.MANIFEST_TYPE]
WORLD = World(root_keys=KEYS[:1], release_keys=KEYS[1:2], channel_keys=KEYS[2:3])
ROOT = WORLD.root()

component = st.text("abcxyz0189._+-", min_size=1, max_size=8).filter(lambda c: c not in (".", ".."))
tree_files = st.dictionaries(
    st.lists(component, min_size=1, max_size=3).map("/".join),
    st.binary(max_size=64),
    min_size=1,
    max_size=6,
).filter(
    # A path may not sit below another file (the manifest refuses that by design).
    lambda files: not any(b.startswith(a + "/") for a in files for b in files)
)


def _flip(data: bytes, index: int, bit: int) -> bytes:
    out = bytearray(data)
    out[index % len(out)] ^= 1 << bit
    return bytes(out)


@given(
    st.sampled_from(TYPES),
    st.binary(max_size=256),
    st.sets(st.integers(0, len(KEYS) - 1), min_size=1),
)
def test_envelope_round_trip_keeps_payload_and_signers(
    payload_type: str, payload: bytes, signers: set[int]
) -> None:
    env = dsse.Envelope(payload_type, payload)
    for i in sorted(signers):
        env.sign(KEYS[i])
    back = dsse.from_bytes(env.to_bytes(), payload_type)
    assert (back.payload_type, back.payload, back.signatures) == (
        payload_type,
        payload,
        env.signatures,
    )
    role = dsse.Role("release", len(signers), {k.keyid: k.public for k in KEYS})
    assert dsse.verify(back, role, "doc") == {KEYS[i].keyid for i in signers}


@given(st.binary(min_size=1, max_size=256), st.integers(0, 10**6), st.integers(0, 7))
def test_a_changed_payload_bit_loses_every_signature(payload: bytes, at: int, bit: int) -> None:
    env = dsse.Envelope(dsse.MANIFEST_TYPE, payload)
    env.sign(KEYS[0])
    tampered = dsse.Envelope(env.payload_type, _flip(payload, at, bit), env.signatures)
    role = dsse.Role("release", 1, {KEYS[0].keyid: KEYS[0].public})
    with pytest.raises(dsse.SignatureError):
        dsse.verify(dsse.from_bytes(tampered.to_bytes(), dsse.MANIFEST_TYPE), role, "doc")


@given(st.binary(max_size=64), st.integers(0, 63), st.integers(0, 7))
def test_a_changed_signature_bit_is_not_a_signature(payload: bytes, at: int, bit: int) -> None:
    env = dsse.Envelope(dsse.MANIFEST_TYPE, payload)
    env.sign(KEYS[0])
    keyid, sig = env.signatures[0]
    env.signatures = [(keyid, _flip(sig, at, bit))]
    role = dsse.Role("release", 1, {KEYS[0].keyid: KEYS[0].public})
    assert dsse.valid_signers(env, role) == set()


@given(st.sampled_from(TYPES), st.sampled_from(TYPES), st.binary(max_size=64))
def test_a_signature_counts_only_for_its_own_payload_type(
    signed_as: str, checked_as: str, payload: bytes
) -> None:
    env = dsse.Envelope(signed_as, payload)
    env.sign(KEYS[0])
    role = dsse.Role("release", 1, {KEYS[0].keyid: KEYS[0].public})
    moved = dsse.Envelope(checked_as, payload, env.signatures)
    assert bool(dsse.valid_signers(moved, role)) == (signed_as == checked_as)


@given(tree_files, st.integers(1, 2**40))
def test_signed_manifest_round_trips_and_pins_every_file(
    files: dict[str, bytes], counter: int
) -> None:
    payload, pack = release(files, counter)
    env = dsse.from_bytes(WORLD.manifest_env(payload).to_bytes(), dsse.MANIFEST_TYPE)
    got = verify.verify_manifest(env, ROOT, start=REF, node=NODE, agent_version=AGENT)
    m = got.manifest
    assert m.release.counter == counter
    assert m.daemon is not None
    assert [(f.path, f.size) for f in m.daemon.files] == [(p, len(d)) for p, d in files.items()]
    assert m.blobs == {m.daemon.pack: len(pack)}
    check = verify.BlobCheck(m.daemon.pack, len(pack))
    check.update(pack)
    check.finish()


@given(tree_files, st.integers(0, 10**6), st.integers(0, 7))
def test_a_changed_pack_byte_is_refused(files: dict[str, bytes], at: int, bit: int) -> None:
    payload, pack = release(files)
    m = manifest.parse(payload)
    assert m.daemon is not None
    check = verify.BlobCheck(m.daemon.pack, len(pack))
    if not pack:  # nothing to flip: one byte too many is the tampering then
        with pytest.raises(VerificationError, match="longer than its signed size"):
            check.update(b"x")
        return
    check.update(_flip(pack, at, bit))
    with pytest.raises(VerificationError, match="does not match its signed hash"):
        check.finish()


@given(tree_files, st.integers(0, 10**6))
def test_a_cut_or_lengthened_pack_is_refused(files: dict[str, bytes], cut: int) -> None:
    payload, pack = release(files)
    pack_id = manifest.parse(payload).blob_order[0]
    short = verify.BlobCheck(pack_id, len(pack))
    short.update(pack[: cut % (len(pack) + 1)])
    if short.remaining:
        with pytest.raises(VerificationError, match="short of its signed size"):
            short.finish()
    long = verify.BlobCheck(pack_id, len(pack))
    with pytest.raises(VerificationError, match="longer than its signed size"):
        long.update(pack + b"\0")


@given(tree_files, st.data())
def test_a_changed_signed_field_fails_the_signature(files: dict[str, bytes], data: Any) -> None:
    """Re-serialising a manifest with one field changed (a file's hash, the counter,
    the compatibility list) but the old signatures is refused before it is parsed."""
    payload, _pack = release(files)
    env = WORLD.manifest_env(payload)
    changed = json.loads(env.payload)
    field = data.draw(st.sampled_from(["hash", "counter", "compatible"]))
    if field == "hash":
        entry = changed["components"]["smechvisord"]["tree"]["files"][0]
        entry["h"] = "0" * 64 if entry["h"] != "0" * 64 else "1" * 64
    elif field == "counter":
        changed["release"]["counter"] += data.draw(st.integers(1, 1000))
    else:
        changed["compatible"] = ["smechvisor/aarch64"]
    forged = dsse.Envelope(dsse.MANIFEST_TYPE, json.dumps(changed).encode(), env.signatures)
    with pytest.raises(dsse.SignatureError):
        verify.verify_manifest(forged, ROOT, start=REF, node=NODE, agent_version=AGENT)


@given(st.lists(st.sets(st.integers(0, len(KEYS) - 1), min_size=1), min_size=1, max_size=4))
def test_root_rotation_chain_verifies_and_skipping_old_keys_breaks_it(
    key_sets: list[set[int]],
) -> None:
    """Roots v2..vN, each with a new root key set, each signed by the previous set and
    its own: the chain reaches vN. Signed by its own keys only, any step is refused."""
    world = World(root_keys=KEYS[:1], release_keys=KEYS[1:2], channel_keys=KEYS[2:3])
    start = world.root()
    envs = []
    previous = world.root_keys
    for version, chosen in enumerate(key_sets, start=2):
        world.root_keys = [KEYS[i] for i in sorted(chosen)]
        envs.append(world.root_env(version, signers=[*previous, *world.root_keys]))
        previous = world.root_keys
    newest, added = roots.chain_from_list(start, list(reversed(envs)))
    assert newest.version == len(key_sets) + 1 and len(added) == len(key_sets)
    assert newest.keyids("root") == {k.keyid for k in previous}
    current = start
    for env in envs:
        current = roots.verify_next(current, env.to_bytes())
    assert current.version == newest.version
    # The first step signed by the new keys alone: refused unless they include the old.
    first = [KEYS[i] for i in sorted(key_sets[0])]
    world.root_keys = first
    alone = world.root_env(2, signers=first)
    if KEYS[0] in first:
        assert roots.verify_next(start, alone.to_bytes()).version == 2
    else:
        with pytest.raises(VerificationError, match="old keys"):
            roots.verify_next(start, alone.to_bytes())


@given(st.sampled_from(KEYS), st.one_of(st.none(), st.binary(min_size=1, max_size=32)))
def test_key_material_round_trips(key: keys.SigningKey, passphrase: bytes | None) -> None:
    pem = key.to_pem(passphrase)
    assert keys.parse_signing_key(pem, passphrase, "k").keyid == key.keyid
    doc = keys.public_doc(key.public)
    assert keys.parse_public_key(json.dumps(doc).encode(), "k.pub") == key.public
    doc["keyid"] = keys.keyid_of(b"another key")
    with pytest.raises(ConfigError, match="keyid does not match"):
        keys.parse_public_key(json.dumps(doc).encode(), "k.pub")


@given(st.integers(-(10**6), 10**6))
def test_root_expiry_is_a_strict_bound_at_any_reference_time(offset_s: int) -> None:
    at = ROOT.expires + dt.timedelta(seconds=offset_s)
    if offset_s < 0:
        roots.check_expiry(ROOT, at)
    else:
        with pytest.raises(VerificationError, match="expired"):
            roots.check_expiry(ROOT, at)
