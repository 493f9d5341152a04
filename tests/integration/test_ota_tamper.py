"""Refusals: every tampered, mis-signed, stale or unsafe update exits 3 with its reason,
and the node does not change by one byte (the whole sysroot is hashed before and after).

Runs the real CLI in-process (`spk-visor ota apply/check`) against a node sandbox.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from spk_visor.ota import bundle
from spk_visor.ota.journal import Floor
from spk_visor.trust import dsse, keys, manifest
from tests.support import cli
from tests.support.ota_pki import Node, Pki, make_bundle, make_node, signed_manifest, tiny_tree

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def pki() -> Pki:
    return Pki()


@pytest.fixture
def node(tmp_path: Path, pki: Pki) -> Node:
    n = make_node(tmp_path, pki)
    # Let the node create its lock file and run its (empty) recovery once.
    assert cli.run("ota", "recover", env=n.env).code == 0
    return n


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A small 'base image': random-ish but compressible bytes."""
    path = tmp_path / "base.img"
    chunk = bytes(range(256)) * 256
    path.write_bytes(chunk * 40 + b"\x00" * 300_000)
    return path


def _split(path: Path) -> tuple[bundle.BundleHeader, list[bytes]]:
    with path.open("rb") as f:
        header = bundle.read_header(f)
        parsed = manifest.parse(header.manifest.payload_json())
        blobs = [f.read(size) for size in parsed.blobs.values()]
    return header, blobs


def _rebundle(
    out: Path,
    env: dsse.Envelope,
    blobs: list[bytes],
    roots: list[dsse.Envelope] = (),  # type: ignore[assignment]
) -> Path:
    envelope = json.dumps({"manifest": env.to_doc(), "roots": [r.to_doc() for r in roots]}).encode()
    out.write_bytes(bundle.MAGIC + struct.pack(">I", len(envelope)) + envelope + b"".join(blobs))
    return out


def _refused(node: Node, path: Path, reason: str) -> None:
    before = node.tree_digest()
    res = cli.run("ota", "apply", "--bundle", str(path), env=node.env)
    assert res.code == 3, (res.code, res.err)
    assert reason in res.err, res.err
    assert node.tree_digest() == before, "a refused bundle changed the node"


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def _flip_b64(data: bytes, offset: int) -> bytes:
    """Change one base64 character to another valid one (the decoded bytes change)."""
    c = data[offset : offset + 1]
    swap = b"B" if c != b"B" else b"C"
    return data[:offset] + swap + data[offset + 1 :]


def test_good_bundle_passes_check_with_zero_writes(
    tmp_path: Path, pki: Pki, node: Node, image: Path
) -> None:
    built = make_bundle(tmp_path, pki, image=image, tree=None)
    before = node.tree_digest()
    res = cli.run("ota", "check", "--bundle", str(built.bundle), "--json", env=node.env)
    assert res.code == 0, res.err
    doc = json.loads(res.out.splitlines()[-1])
    assert doc["event"] == "result" and doc["base"] == "stage" and doc["changes"] is True
    assert node.tree_digest() == before


def test_tamper_matrix_every_region(tmp_path: Path, pki: Pki, node: Node, image: Path) -> None:
    tree = tmp_path / "t"
    tiny_tree(tree, "0.2.0")
    built = make_bundle(tmp_path, pki, tree=tree, image=image)
    raw = built.bundle.read_bytes()
    (length,) = struct.unpack(">I", raw[8:12])
    env_start, env_end = 12, 12 + length
    envelope = raw[env_start:env_end]
    _header, blobs = _split(built.bundle)
    assert len(blobs) == 2
    payload_at = env_start + envelope.index(b'"payload":"') + len('"payload":"') + 40
    sig_at = env_start + envelope.index(b'"sig":"') + len('"sig":"') + 10
    keyid_at = env_start + envelope.index(b'"keyid":"') + len('"keyid":"') + 3
    blob1_at = env_end + 5
    blob2_at = env_end + len(blobs[0]) + len(blobs[1]) // 2
    # A flipped magic is no bundle at all: as a named file, the user's mistake (exit 2,
    # test_ota_cli_mistakes.py::test_a_named_file_that_is_not_a_bundle_is_the_users_mistake).
    cases = {
        "format version": (_flip(raw, 7), "not supported"),
        "length": (raw[:8] + struct.pack(">I", length + 7) + raw[12:], "bundle"),
        "length huge": (raw[:8] + struct.pack(">I", 0x7FFFFFFF) + raw[12:], "out of bounds"),
        "envelope json": (_flip(raw, env_start), "not valid JSON"),
        "payload": (_flip_b64(raw, payload_at), "signature"),
        "signature": (_flip_b64(raw, sig_at), "0 valid release signature"),
        "keyid": (_flip(raw, keyid_at), "0 valid release signature"),
        "blob 1": (_flip(raw, blob1_at), "does not match its signed hash"),
        "blob 2": (_flip(raw, blob2_at), "does not match its signed hash"),
        "appended": (raw + b"\x00", "bytes after its last blob"),
        "truncated": (raw[:-1], "truncated"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / f"tampered-{name.replace(' ', '-')}.spkb"
        path.write_bytes(data)
        _refused(node, path, reason)


def test_wrong_key_wrong_role_and_threshold_short(tmp_path: Path, pki: Pki, node: Node) -> None:
    stranger = keys.generate()
    _refused(
        node,
        make_bundle(tmp_path, pki, signers=[stranger], name="a.spkb").bundle,
        "0 valid release signature(s), 1 required",
    )
    # The channel key is trusted, but not to sign releases.
    _refused(
        node,
        make_bundle(tmp_path, pki, signers=pki.channel, name="b.spkb").bundle,
        "0 valid release signature(s), 1 required",
    )
    # The root key of the node cannot sign a release either.
    _refused(
        node,
        make_bundle(tmp_path, pki, signers=pki.root, name="c.spkb").bundle,
        "0 valid release signature(s)",
    )


def test_threshold_one_short(tmp_path: Path) -> None:
    pki = Pki(release=[keys.generate(), keys.generate()])
    pki.thresholds["release"] = 2
    node = make_node(tmp_path, pki)
    assert cli.run("ota", "recover", env=node.env).code == 0
    one = make_bundle(tmp_path, pki, signers=pki.release[:1], name="one.spkb")
    _refused(node, one.bundle, "1 valid release signature(s), 2 required")
    # The same key twice still counts once.
    header, blobs = _split(one.bundle)
    env = header.manifest
    env.signatures = env.signatures * 2
    _refused(
        node,
        _rebundle(tmp_path / "dup.spkb", env, blobs),
        "1 valid release signature(s), 2 required",
    )
    both = make_bundle(tmp_path, pki, signers=pki.release, name="both.spkb")
    assert cli.run("ota", "check", "--bundle", str(both.bundle), env=node.env).code == 0


def test_counter_below_floor(tmp_path: Path, pki: Pki, node: Node) -> None:
    Floor(node.paths).raise_to(10)
    _refused(node, make_bundle(tmp_path, pki, counter=9).bundle, "below this node's floor 10")


def test_unsafe_manifest_paths(tmp_path: Path, pki: Pki, node: Node) -> None:
    built = make_bundle(tmp_path, pki)
    header, blobs = _split(built.bundle)
    base = header.manifest.payload_json()

    def variant(name: str, mutate: Any, reason: str) -> None:
        payload = json.loads(json.dumps(base))
        mutate(payload["components"]["smechvisord"]["tree"])
        env = signed_manifest(payload, pki.release)
        _refused(node, _rebundle(tmp_path / f"{name}.spkb", env, blobs), reason)

    def dotdot(tree: dict[str, Any]) -> None:
        tree["files"][0]["p"] = "../../etc/passwd"

    def absolute(tree: dict[str, Any]) -> None:
        tree["files"][0]["p"] = "/etc/passwd"

    def symlink_escape(tree: dict[str, Any]) -> None:
        tree["symlinks"] = [{"p": "lib/evil", "t": "../../../etc"}]

    def symlink_abs(tree: dict[str, Any]) -> None:
        tree["symlinks"] = [{"p": "lib/evil", "t": "/etc"}]

    def through_symlink(tree: dict[str, Any]) -> None:
        tree["symlinks"] = [{"p": "lib/dir", "t": "."}]
        tree["files"][0]["p"] = "lib/dir/x"

    variant("dotdot", dotdot, "unsafe path '../../etc/passwd'")
    variant("absolute", absolute, "unsafe path '/etc/passwd'")
    variant("symlink-escape", symlink_escape, "escapes the tree")
    variant("symlink-abs", symlink_abs, "must be relative")
    variant("through-symlink", through_symlink, "lies below another entry")


def test_bundle_bigger_than_declared_blob(tmp_path: Path, pki: Pki, node: Node) -> None:
    built = make_bundle(tmp_path, pki)
    header, blobs = _split(built.bundle)
    # One extra byte inside the blob region: sizes come from the manifest, so it is trailing.
    _refused(
        node,
        _rebundle(tmp_path / "big.spkb", header.manifest, [blobs[0] + b"x"]),
        "bytes after its last blob",
    )


def test_root_rotation_in_bundle(tmp_path: Path, pki: Pki, node: Node) -> None:
    """v2 signed by old and new root keys is accepted and persisted; only-new is refused."""
    new_root = keys.generate()
    new_release = keys.generate()
    pki2 = Pki(root=[new_root], release=[new_release], channel=pki.channel)
    v2 = pki2.root_env(2, signers=[pki.root[0], new_root])
    good = make_bundle(tmp_path, pki2, roots_carried=[v2], name="rot.spkb")
    assert cli.run("ota", "check", "--bundle", str(good.bundle), env=node.env).code == 0
    # Signed by the new keys only: the old root's threshold is not met.
    v2_bad = pki2.root_env(2, signers=[new_root])
    bad = make_bundle(tmp_path, pki2, roots_carried=[v2_bad], name="rot-bad.spkb")
    _refused(node, bad.bundle, "root v2 (old keys)")
    # A version jump (v3 right after v1) does not chain: the release key stays unknown.
    v3 = pki2.root_env(3, signers=[pki.root[0], new_root])
    jump = make_bundle(tmp_path, pki2, roots_carried=[v3], name="rot-jump.spkb")
    _refused(node, jump.bundle, "0 valid release signature(s)")


def test_expired_root_refused(tmp_path: Path, pki: Pki) -> None:
    node = make_node(tmp_path, pki)
    node.install_root(pki.root_env(expires=dt.timedelta(days=-1)))
    assert cli.run("ota", "recover", env=node.env).code == 0
    _refused(node, make_bundle(tmp_path, pki).bundle, "expired")
