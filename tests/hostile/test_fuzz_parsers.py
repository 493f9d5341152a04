"""Property tests of every parser of untrusted input in OTA and deploy (issue 11, fuzzing).

The property is the same everywhere: whatever the bytes, the parser answers with its
documented result or raises its documented error type, nothing else (no KeyError, no
TypeError, no RecursionError, no crash). Signed documents are fuzzed *after* signing with
the right key, the way a compromised or buggy build host would produce them, so the
schema checks behind the signature are reached; raw bytes are fuzzed before it.

Bounded examples in CI (profile `ci`, tests/hostile/conftest.py); `make fuzz` runs the
same properties long (HYPOTHESIS_PROFILE=fuzz).
"""

from __future__ import annotations

import atexit
import copy
import datetime as dt
import functools
import io
import json
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spk_visor import strict_json
from spk_visor.deploy import (
    channel,
    discovery,
    donor,
    hostname,
    install,
    inventory,
    messages,
    receiver,
)
from spk_visor.deploy.code import new_code
from spk_visor.errors import SpkVisorError, TransportError, VerificationError
from spk_visor.ota import bundle
from spk_visor.ota.verify import verify_manifest
from spk_visor.trust import dsse, manifest, roots, verify
from tests.support.ota_pki import Pki, make_bundle

pytestmark = pytest.mark.fuzz

NOW = dt.datetime.now(dt.UTC)

# -- strategies ----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["", ".", "..", "../x", "/etc", "a/../..", "x\n", "sha256:" + "0" * 64])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document (dict keys, list indices)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """`base` with one to three places replaced by arbitrary JSON, or deleted."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        places = [p for p in _paths(doc) if p]
        if not places:
            break
        where = draw(st.sampled_from(places))
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = draw(json_values)
    return doc


# -- fixtures built once (hypothesis calls the test body many times) ----------------------


@functools.cache
def _release() -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="spk-fuzz-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    pki = Pki()
    image = tmp / "base.img"
    image.write_bytes(bytes(range(256)) * 64)
    built = make_bundle(tmp, pki, image=image)
    raw = built.bundle.read_bytes()
    with built.bundle.open("rb") as f:
        header = bundle.read_header(f)
    built.bundle.unlink()
    root = roots.load_anchor(pki.root_env().to_bytes(), "fuzz root")
    return {
        "pki": pki,
        "raw": raw,
        "payload": header.manifest.payload_json(),
        "envelope": header.manifest,
        "root": root,
        "root_payload": pki.root_env().payload_json(),
    }


def _sign(payload_type: str, doc: Any, signers: list[Any]) -> dsse.Envelope:
    env = dsse.new(payload_type, doc)
    for key in signers:
        env.sign(key)
    return env


# -- OTA -----------------------------------------------------------------------------------


@given(st.data())
def test_spkb_parser_refuses_mutated_bundles_with_verification_errors(data: st.DataObject) -> None:
    r = _release()
    raw = bytearray(r["raw"])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "set"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del raw[pos:]
        elif kind == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            raw[pos : pos + 4] = data.draw(st.binary(min_size=4, max_size=4))
    try:
        stream = io.BytesIO(bytes(raw))
        header = bundle.read_header(stream)
        verified = verify_manifest(header.manifest, r["root"], start=NOW)
        for size in verified.manifest.blobs.values():
            if len(stream.read(size)) != size:
                raise VerificationError("short blob")
        bundle.expect_eof(stream)
    except VerificationError:
        pass


@given(st.data())
def test_signed_manifest_schema_refuses_with_verification_errors(data: st.DataObject) -> None:
    r = _release()
    payload = data.draw(mutated(r["payload"]))
    env = _sign(dsse.MANIFEST_TYPE, payload, r["pki"].release)
    try:
        verified = verify_manifest(env, r["root"], start=NOW)
    except VerificationError:
        return
    # Whatever passed is safe to install: every path plain, every symlink inside the tree.
    parsed = verified.manifest
    if parsed.daemon is not None:
        links = {s.path: s.target for s in parsed.daemon.symlinks}
        for s in parsed.daemon.symlinks:
            assert manifest.resolve_in_tree(s.path, links) is not None
        for f in parsed.daemon.files:
            assert manifest.PATH_RE.fullmatch(f.path)


@given(st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()))
def test_envelopes_from_raw_bytes(raw: bytes) -> None:
    try:
        dsse.from_bytes(raw, dsse.ROOT_TYPE)
    except VerificationError:
        pass


@given(st.data())
def test_root_documents_refuse_with_verification_errors(data: st.DataObject) -> None:
    r = _release()
    payload = data.draw(mutated(r["root_payload"]))
    env = _sign(dsse.ROOT_TYPE, payload, r["pki"].root)
    try:
        roots.load_anchor(env.to_bytes(), "fuzzed root")
        roots.verify_successor(r["root"], env)
    except VerificationError:
        pass


@given(st.data())
def test_channel_documents_refuse_with_documented_errors(data: st.DataObject) -> None:
    r = _release()
    base = {
        "type": verify.CHANNEL_DOC_TYPE,
        "channel": "stable",
        "serial": 3,
        "issued": roots.format_time(NOW),
        "expires": roots.format_time(NOW + dt.timedelta(days=1)),
        "manifest": {"sha256": "0" * 64, "size": 10, "counter": 2, "version": "1.0"},
        "rollout": {"percent": 50, "salt": "x"},
    }
    payload = data.draw(mutated(base))
    env = _sign(dsse.CHANNEL_TYPE, payload, r["pki"].channel)
    stored: dict[str, Any] | None = data.draw(
        st.none() | st.just({"serial": 2, "keyids": [], "payload_sha256": None})
    )
    try:
        verify.verify_channel(env, r["root"], name="stable", start=NOW, stored=stored)
    except (VerificationError, TransportError):
        pass


@given(
    st.binary(max_size=256)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)
    | st.sampled_from([b'{"a":1,"a":2}', b"NaN", b"[Infinity]", b"\xff\xfe"])
)
def test_strict_json_raises_only_value_errors(raw: bytes) -> None:
    try:
        strict_json.loads(raw)
    except ValueError:
        pass


# -- deploy --------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.sampled_from(["send", "recv"]), st.integers(0, 255)), max_size=30))
def test_message_state_machine_only_raises_channel_errors(steps: list[tuple[str, int]]) -> None:
    for side in ("donor", "target"):
        machine = messages.StateMachine(side)
        for direction, mtype in steps:
            try:
                machine.check(direction, mtype)  # type: ignore[arg-type]
            except channel.ChannelError:
                break


@given(st.binary(max_size=2048))
def test_record_layer_refuses_garbage_with_channel_errors(raw: bytes) -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        chan = channel.SecureChannel(b, b"\x01" * 32, b"\x02" * 32, "0000", idle_timeout=2)
        for _ in range(4):
            try:
                chan.recv_json()
            except channel.ChannelError:
                break
    finally:
        a.close()
        b.close()


@given(st.binary(max_size=600))
def test_target_handshake_refuses_garbage(raw: bytes) -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        try:
            channel.target_handshake(b, new_code("42"), b"\x00" * 16, timeout=2)
            raise AssertionError("garbage completed a handshake")
        except (channel.ChannelError, channel.WrongCode):
            pass
    finally:
        a.close()
        b.close()


_ANNOUNCEMENT = json.loads(discovery.announcement_bytes("42", 0, b"\x00" * 16))


@given(st.binary(max_size=600) | mutated(_ANNOUNCEMENT).map(lambda d: json.dumps(d).encode()))
def test_announcements_parse_or_are_ignored(raw: bytes) -> None:
    ann = discovery.parse_announcement(raw, "10.0.0.1")
    assert ann is None or isinstance(ann, discovery.Announcement)


def _disk() -> inventory.Disk:
    return inventory.Disk(
        name="loop9", path="/dev/loop9", size=8 << 30, logical_sector=512, physical_sector=512,
        model="m", serial="S1", wwn="", transport="", rotational=False, removable=False,
        read_only=False, has_signatures=False, mounted=False, boot_medium=False, eligible=True,
    )  # fmt: skip


@given(st.data())
def test_plans_are_refused_with_plan_refused(data: st.DataObject) -> None:
    r = _release()
    base = {
        "manifest": r["envelope"].to_doc(),
        "disk": {"serial": "S1", "size": 8 << 30},
        "layout": "ab",
        "hostname": "node-1",
        "confirm_wipe_serial": None,
    }
    plan = data.draw(mutated(base))
    try:
        resolved = install.validate_plan(plan, [_disk()], r["root"], now=NOW)
    except install.PlanRefused:
        return
    assert hostname.HOSTNAME_RE.match(resolved.hostname) and "\n" not in resolved.hostname


@given(json_values)
def test_donor_reads_any_hello(hello: Any) -> None:
    """The donor plans from the target's HELLO: garbage there is a refusal, not a crash."""
    payload = donor.Payload(Path("/nonexistent"), {}, "0" * 64, {}, {})
    target = donor.Target("42-AAAAA", "42", "127.0.0.1", 1, None)
    session = donor._Session(target, payload, donor.Settings(), donor._Silent())
    try:
        session.plan(hello if isinstance(hello, dict) else {"disks": hello})
    except donor.DeployFailed:
        pass


@given(st.binary(max_size=300))
def test_receiver_message_payloads(raw: bytes) -> None:
    try:
        receiver._json(raw)
    except receiver.SessionFailed:
        pass


def test_profile_is_bounded_in_ci() -> None:
    """The CI profile really is bounded (a long run needs HYPOTHESIS_PROFILE=fuzz)."""
    from hypothesis import settings  # noqa: PLC0415

    assert settings().max_examples <= 20_000
    assert issubclass(strict_json.StrictJSONError, ValueError)
    assert issubclass(VerificationError, SpkVisorError)


def test_plan_hostname_with_a_trailing_newline_is_refused() -> None:
    """`$` in HOSTNAME_RE matched before a final newline, so "node-1\\n" reached the
    target's /etc/hostname."""
    r = _release()
    plan = {
        "manifest": r["envelope"].to_doc(),
        "disk": {"serial": "S1", "size": 8 << 30},
        "layout": "ab",
        "hostname": "node-1\n",
    }
    try:
        install.validate_plan(plan, [_disk()], r["root"], now=NOW)
    except install.PlanRefused as e:
        assert e.reason == "bad_hostname"
    else:
        raise AssertionError("a hostname with a newline was accepted")
