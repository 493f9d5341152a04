"""Signed but hostile manifests, and hostile JSON from a mirror (issue 11, defects 8, 14, 17).

A release key holder (or a bug in a build host) can sign anything; the node must still
refuse what would escape the release tree or crash the parser. Every case runs the real
`spk-visor` in its own process against a node sandbox and ends with the same proof: exit 3
with the reason and no traceback (nothing crashed), the node's files byte-identical
(nothing lost, no one got in), and a good bundle still applies (the service still serves).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spk_visor.ota import bundle
from spk_visor.ota.repo import rel_channel
from spk_visor.trust import dsse, manifest
from tests.integration.test_ota_pull import _conf, _publish
from tests.support.flaky_repo import FlakyRepo
from tests.support.ota_pki import Node, Pki, make_bundle, make_node, signed_manifest, tiny_tree

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEEP = 100_000


def _spk(node: Node, *args: str) -> tuple[int, str]:
    env = {
        **os.environ,
        **node.env,
        "SPK_VISOR_CONFIG": "/nonexistent",
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "spk_visor", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stderr


def _split(path: Path) -> tuple[dict[str, Any], list[bytes]]:
    with path.open("rb") as f:
        header = bundle.read_header(f)
        payload = header.manifest.payload_json()
        blobs = [f.read(size) for size in manifest.parse(payload).blobs.values()]
    return payload, blobs


def _rebundle(out: Path, env: dsse.Envelope, blobs: list[bytes]) -> Path:
    envelope = json.dumps({"manifest": env.to_doc(), "roots": []}).encode()
    out.write_bytes(bundle.MAGIC + struct.pack(">I", len(envelope)) + envelope + b"".join(blobs))
    return out


def _node(tmp: Path, pki: Pki) -> Node:
    node = make_node(tmp, pki)
    # The node's lock file and (empty) recovery exist before anything is compared.
    assert _spk(node, "ota", "recover")[0] == 0
    return node


def _refused_then_good(node: Node, pki: Pki, tmp_path: Path, bad: Path, reason: str) -> None:
    before = node.tree_digest()
    for verb in ("check", "apply"):
        code, err = _spk(node, "ota", verb, "--bundle", str(bad))
        assert code == 3, (verb, code, err)
        assert "Traceback" not in err and reason in err, err
    assert node.tree_digest() == before, "a refused bundle changed the node"
    good = make_bundle(tmp_path, pki, counter=3, name="good.spkb")
    code, err = _spk(node, "ota", "check", "--bundle", str(good.bundle))
    assert code == 0, err


def _tree(payload: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = payload["components"]["smechvisord"]["tree"]
    return tree


def _daemon(payload: dict[str, Any]) -> dict[str, Any]:
    daemon: dict[str, Any] = payload["components"]["smechvisord"]
    return daemon


def _chain(p: dict[str, Any]) -> None:
    _tree(p)["symlinks"] = [
        {"p": "lib/w", "t": "."},
        {"p": "lib/z", "t": "w/.."},
        {"p": "bin/up2", "t": "../lib/z/.."},
    ]


def _loop(p: dict[str, Any]) -> None:
    _tree(p)["symlinks"] = [{"p": "lib/a", "t": "b"}, {"p": "lib/b", "t": "a"}]


def _newline_path(p: dict[str, Any]) -> None:
    _tree(p)["files"][0]["p"] += "\n"


def _control_in_link_target(p: dict[str, Any]) -> None:
    _tree(p)["symlinks"] = [{"p": "lib/l", "t": "VERSION\x1b[2J"}]


def _deep(p: dict[str, Any]) -> None:
    p["x-extension"] = "DEEP"  # replaced by DEEP nested arrays in the raw payload


MUTATIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("symlink-chain", _chain, "escapes the tree"),
    ("symlink-loop", _loop, "loop"),
    ("newline-in-path", _newline_path, "unsafe path"),
    ("control-in-target", _control_in_link_target, "control character"),
    (
        "counter-min-string",
        lambda p: _daemon(p).update(requires_base={"counter_min": "abc"}),
        "counter_min",
    ),
    (
        "counter-min-float",
        lambda p: _daemon(p).update(requires_base={"counter_min": 1.5}),
        "counter_min",
    ),
    ("dev-string", lambda p: p.update(dev="false"), "dev"),
    ("created-number", lambda p: p.update(created=5), "created"),
    ("agent-min-number", lambda p: p["requires"].update(agent_min=3), "agent_min"),
    ("symlinks-number", lambda p: _tree(p).update(symlinks=7), "symlinks"),
    ("mode-string", lambda p: _tree(p)["files"][0].update(m="755"), ".m"),
    ("mode-negative", lambda p: _tree(p)["files"][0].update(m=-1), ".m"),
    ("version-number", lambda p: p["release"].update(version=2), "version"),
    ("deep-nesting", _deep, "nested"),
]


@pytest.mark.parametrize(("name", "mutate", "reason"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_signed_hostile_manifest_is_refused(
    tmp_path: Path, name: str, mutate: Callable[[dict[str, Any]], None], reason: str
) -> None:
    pki = Pki()
    node = _node(tmp_path, pki)
    built = make_bundle(tmp_path, pki)
    payload, blobs = _split(built.bundle)
    payload.setdefault("requires", {})
    mutate(payload)
    env = signed_manifest(payload, pki.release)
    if name == "deep-nesting":
        raw = env.payload.replace(b'"DEEP"', b"[" * DEEP + b"]" * DEEP)
        env = dsse.Envelope(env.payload_type, raw, [])
        for key in pki.release:
            env.sign(key)
    bad = _rebundle(tmp_path / f"{name}.spkb", env, blobs)
    _refused_then_good(node, pki, tmp_path, bad, reason)


def test_ota_build_refuses_a_tree_whose_symlink_chain_escapes(tmp_path: Path) -> None:
    pki = Pki()
    node = make_node(tmp_path, pki)
    tree = tiny_tree(tmp_path / "tree", "0.2.0")
    os.symlink(".", tree / "lib" / "w")
    os.symlink("w/..", tree / "lib" / "z")
    os.symlink("../lib/z/..", tree / "bin" / "up2")
    key = tmp_path / "release.key"
    assert _spk(node, "ota", "keygen", str(key))[0] == 0
    code, err = _spk(
        node, "ota", "build", "--daemon-tree", str(tree), "--version", "0.2.0", "--counter", "2",
        "--key", str(key), "--out", str(tmp_path / "out.spkb"),
    )  # fmt: skip
    # The admin's own tree is at fault (2) or the manifest check refuses it (3).
    assert code in (2, 3), (code, err)
    assert "escapes the tree" in err and "Traceback" not in err, err
    assert not (tmp_path / "out.spkb").exists()


def test_deeply_nested_json_from_a_mirror_is_refused(tmp_path: Path) -> None:
    """A mirror serving `[[[[...]]]]` as the channel document crashed `ota pull` with a
    RecursionError (exit 1). It is an unverifiable document: exit 3."""
    pki = Pki()
    node = _node(tmp_path / "node", pki)
    repo_dir = tmp_path / "repo"
    _publish(tmp_path, pki, repo_dir, size=64 << 10)
    channel = repo_dir / "v1" / rel_channel("stable")
    good = channel.read_bytes()
    channel.write_bytes(b"[" * 5000 + b"]" * 5000)  # under the 16 KiB cap
    with FlakyRepo(repo_dir) as server:
        _conf(node, [server.url])
        before = node.tree_digest()
        code, err = _spk(node, "ota", "pull")
        assert code == 3, (code, err)
        assert "Traceback" not in err and "nested" in err, err
        assert node.tree_digest() == before
        channel.write_bytes(good)
        code, err = _spk(node, "ota", "pull")
        assert code == 0, err
