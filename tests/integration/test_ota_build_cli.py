"""The build side through the CLI, as an admin runs it: keygen, root init/sign/rotate,
build, inspect, verify, publish, bundle explode/pack."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from spk_visor.ota.keys import load_signing_key
from spk_visor.trust import keys
from tests.support import cli
from tests.support.ota_pki import tiny_tree

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def ok(*argv: str) -> dict[str, object]:
    res = cli.run(*argv, "--json")
    assert res.code == 0, (argv, res.err)
    doc = json.loads(res.out)
    assert isinstance(doc, dict)
    return doc


def test_keygen_files_and_keyid(tmp_path: Path) -> None:
    doc = ok("ota", "keygen", str(tmp_path / "k"))
    mode = stat.S_IMODE((tmp_path / "k").stat().st_mode)
    assert mode == 0o600
    pub = json.loads((tmp_path / "k.pub").read_text())
    assert pub["keyid"] == doc["keyid"] == keys.keyid_of(bytes.fromhex(pub["public"]))
    # Never overwritten.
    res = cli.run("ota", "keygen", str(tmp_path / "k"))
    assert res.code == 2 and "exists" in res.err
    # A key others can read is refused, as OpenSSH does.
    (tmp_path / "k").chmod(0o644)
    with pytest.raises(Exception, match="readable by other users"):
        load_signing_key(tmp_path / "k")


def test_passphrase_protected_key(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("correct horse\n")
    ok("ota", "keygen", str(tmp_path / "k"), "--passphrase-file", str(secret))
    assert b"ENCRYPTED" in (tmp_path / "k").read_bytes()
    assert load_signing_key(tmp_path / "k", b"correct horse").keyid
    with pytest.raises(Exception, match="passphrase"):
        load_signing_key(tmp_path / "k")


def test_admin_flow_end_to_end(tmp_path: Path) -> None:
    for name in ("root1", "root2", "rel", "chan"):
        ok("ota", "keygen", str(tmp_path / name))
    root = tmp_path / "root.json"
    ok(
        "ota",
        "root",
        "init",
        "--out",
        str(root),
        "--root-key",
        str(tmp_path / "root1.pub"),
        "--root-key",
        str(tmp_path / "root2.pub"),
        "--root-threshold",
        "2",
        "--release-key",
        str(tmp_path / "rel.pub"),
        "--channel-key",
        str(tmp_path / "chan.pub"),
    )
    ok("ota", "root", "sign", str(root), "--key", str(tmp_path / "root1"))
    tree = tiny_tree(tmp_path / "tree", "0.9.0")
    bundle = tmp_path / "out" / "spk-0.9.0.spkb"
    ok(
        "ota",
        "build",
        "--daemon-tree",
        str(tree),
        "--version",
        "0.9.0",
        "--counter",
        "9",
        "--key",
        str(tmp_path / "rel"),
        "--out",
        str(bundle),
    )
    # One root signature of a 2-of-2 root: the root itself does not verify.
    res = cli.run("ota", "verify", str(bundle), "--root", str(root))
    assert res.code == 3 and "1 valid root signature(s), 2 required" in res.err, res.err
    ok("ota", "root", "sign", str(root), "--key", str(tmp_path / "root2"))
    doc = ok("ota", "verify", str(bundle), "--root", str(root))
    assert doc["verified"] is True and doc["version"] == "0.9.0" and doc["counter"] == 9
    shown = ok("ota", "inspect", str(bundle))
    assert shown["verified"] is False and shown["manifest_sha256"] == doc["manifest_sha256"]
    # Publish, re-sign (serial moves on), explode/pack round trip.
    repo = tmp_path / "repo"
    ch = ok(
        "ota",
        "publish",
        "--repo",
        str(repo),
        "--bundle",
        str(bundle),
        "--key",
        str(tmp_path / "chan"),
        "--rollout",
        "25",
        "--expires",
        "7d",
    )
    assert ch["serial"] == 1 and ch["rollout"] == {"percent": 25.0, "salt": ch["rollout"]["salt"]}  # type: ignore[index]
    ch2 = ok("ota", "publish", "--repo", str(repo), "--key", str(tmp_path / "chan"))
    assert ch2["serial"] == 2 and ch2["manifest"] == ch["manifest"]
    sha = str(doc["manifest_sha256"])
    assert (repo / "v1" / "manifests" / f"{sha}.json").is_file()
    packed = tmp_path / "packed.spkb"
    ok("ota", "bundle", "pack", "--repo", str(repo), "--manifest", sha, "--out", str(packed))
    assert ok("ota", "verify", str(packed), "--root", str(root))["manifest_sha256"] == sha
    # A rotated root: v2 needs the old threshold and the new one.
    ok("ota", "keygen", str(tmp_path / "root3"))
    root2 = tmp_path / "root2.json"
    ok(
        "ota",
        "root",
        "rotate",
        str(root),
        "--out",
        str(root2),
        "--root-key",
        str(tmp_path / "root3.pub"),
        "--release-key",
        str(tmp_path / "rel.pub"),
        "--channel-key",
        str(tmp_path / "chan.pub"),
    )
    ok(
        "ota",
        "root",
        "sign",
        str(root2),
        "--previous",
        str(root),
        "--key",
        str(tmp_path / "root3"),
        "--key",
        str(tmp_path / "root1"),
        "--key",
        str(tmp_path / "root2"),
    )
    carried = tmp_path / "carried.spkb"
    ok(
        "ota",
        "build",
        "--daemon-tree",
        str(tiny_tree(tmp_path / "tree-0.9.1", "0.9.1")),
        "--version",
        "0.9.1",
        "--counter",
        "10",
        "--key",
        str(tmp_path / "rel"),
        "--out",
        str(carried),
        "--root",
        str(root2),
    )
    assert ok("ota", "verify", str(carried), "--root", str(root))["root_version"] == 2


def test_build_refuses_bad_trees(tmp_path: Path) -> None:
    ok("ota", "keygen", str(tmp_path / "rel"))
    tree = tiny_tree(tmp_path / "tree", "1.0.0")
    (tree / "bad name!").write_text("x")
    res = cli.run(
        "ota",
        "build",
        "--daemon-tree",
        str(tree),
        "--version",
        "1",
        "--counter",
        "1",
        "--key",
        str(tmp_path / "rel"),
        "--out",
        str(tmp_path / "b.spkb"),
    )
    assert res.code == 2 and "name not allowed" in res.err
    assert not (tmp_path / "b.spkb").exists()
    res = cli.run(
        "ota",
        "build",
        "--version",
        "1",
        "--counter",
        "1",
        "--key",
        str(tmp_path / "rel"),
        "--out",
        str(tmp_path / "b.spkb"),
    )
    assert res.code == 2 and "nothing to build" in res.err


def _build(tmp_path: Path, tree: Path, version: str) -> cli.Result:
    if not (tmp_path / "rel").exists():
        ok("ota", "keygen", str(tmp_path / "rel"))
    out = tmp_path / "out" / f"{tree.name}.spkb"
    res = cli.run(
        "ota", "build", "--daemon-tree", str(tree), "--version", version, "--counter", "1",
        "--key", str(tmp_path / "rel"), "--out", str(out),
    )  # fmt: skip
    if res.code != 0:
        assert not out.exists() and not out.with_name(f"{tree.name}.manifest.json").exists()
    return res


def test_build_refuses_a_tree_nodes_would_roll_back(tmp_path: Path) -> None:
    """No launcher, a launcher that cannot run, no version, another version: each is
    refused with exit 2 and what to do, and nothing is written."""
    no_launcher = tiny_tree(tmp_path / "no-launcher", "1.0.0")
    (no_launcher / "bin" / "smechvisord").unlink()
    res = _build(tmp_path, no_launcher, "1.0.0")
    assert res.code == 2 and "bin/smechvisord" in res.err and "make dist" in res.err, res.err

    not_exec = tiny_tree(tmp_path / "not-exec", "1.0.0")
    (not_exec / "bin" / "smechvisord").chmod(0o644)
    res = _build(tmp_path, not_exec, "1.0.0")
    assert res.code == 2 and "not an executable file" in res.err, res.err

    a_folder = tiny_tree(tmp_path / "a-folder", "1.0.0")
    (a_folder / "bin" / "smechvisord").unlink()
    (a_folder / "bin" / "smechvisord").mkdir()
    (a_folder / "bin" / "smechvisord" / "x").write_text("x")
    res = _build(tmp_path, a_folder, "1.0.0")
    assert res.code == 2 and "not an executable file" in res.err, res.err

    no_version = tiny_tree(tmp_path / "no-version", "1.0.0")
    (no_version / "lib" / "smechvisord" / "version.py").unlink()
    res = _build(tmp_path, no_version, "1.0.0")
    assert res.code == 2 and "lib/smechvisord/version.py" in res.err, res.err

    other = tiny_tree(tmp_path / "other", "1.0.0")
    res = _build(tmp_path, other, "1.0.1")
    assert res.code == 2 and "1.0.0" in res.err and "--version 1.0.0" in res.err, res.err

    assert _build(tmp_path, other, "1.0.0").code == 0


def test_build_help_names_the_manifest_file_beside_the_bundle(tmp_path: Path) -> None:
    res = cli.run("ota", "build", "--help")
    assert res.code == 0
    flat = " ".join(res.out.split())
    assert "X.manifest.json" in flat, flat
    tree = tiny_tree(tmp_path / "t", "2.0.0")
    assert _build(tmp_path, tree, "2.0.0").code == 0
    assert (tmp_path / "out" / "t.manifest.json").is_file()


def _root_pki(tmp_path: Path) -> dict[str, Path]:
    for name in ("root1", "root2", "rel", "chan"):
        ok("ota", "keygen", str(tmp_path / name))
    root = tmp_path / "root.json"
    ok(
        "ota", "root", "init", "--out", str(root), "--root-key", str(tmp_path / "root1.pub"),
        "--release-key", str(tmp_path / "rel.pub"), "--channel-key", str(tmp_path / "chan.pub"),
    )  # fmt: skip
    return {"root": root, **{n: tmp_path / n for n in ("root1", "root2", "rel", "chan")}}


def test_root_sign_refuses_a_key_that_is_not_a_root_key(tmp_path: Path) -> None:
    """`ota root sign --key <channel key>` used to add a useless signature and exit 0; the
    mistake showed only at verify. Now it is refused, naming the acceptable key ids, and
    the document is left as it was."""
    k = _root_pki(tmp_path)
    before = k["root"].read_bytes()
    root1_id = load_signing_key(k["root1"]).keyid
    for wrong in ("chan", "rel", "root2"):
        res = cli.run("ota", "root", "sign", str(k["root"]), "--key", str(k[wrong]))
        assert res.code == 2, (wrong, res)
        assert load_signing_key(k[wrong]).keyid[:16] in res.err, res.err
        assert root1_id in res.err, res.err  # what would be accepted
        assert k["root"].read_bytes() == before
    doc = ok("ota", "root", "sign", str(k["root"]), "--key", str(k["root1"]))
    assert doc["signatures"] == [root1_id]


def test_root_sign_of_a_rotation_takes_the_previous_root_keys(tmp_path: Path) -> None:
    """Root v2 needs the old root keys too: they are accepted when the previous root is
    given (--previous), and a key of neither is refused."""
    k = _root_pki(tmp_path)
    ok("ota", "root", "sign", str(k["root"]), "--key", str(k["root1"]))
    v2 = tmp_path / "root-v2.json"
    ok(
        "ota", "root", "rotate", str(k["root"]), "--out", str(v2),
        "--root-key", str(tmp_path / "root2.pub"), "--release-key", str(tmp_path / "rel.pub"),
        "--channel-key", str(tmp_path / "chan.pub"),
    )  # fmt: skip
    res = cli.run("ota", "root", "sign", str(v2), "--key", str(k["root1"]))
    assert res.code == 2 and "--previous" in res.err, res.err
    res = cli.run(
        "ota", "root", "sign", str(v2), "--key", str(k["chan"]), "--previous", str(k["root"])
    )
    assert res.code == 2 and "not a root key" in res.err, res.err
    doc = ok(
        "ota", "root", "sign", str(v2), "--previous", str(k["root"]),
        "--key", str(k["root1"]), "--key", str(k["root2"]),
    )  # fmt: skip
    assert len(doc["signatures"]) == 2  # type: ignore[arg-type]
    # A previous root that is not version N-1 is not the previous root.
    res = cli.run("ota", "root", "sign", str(v2), "--key", str(k["root1"]), "--previous", str(v2))
    assert res.code == 2 and "version" in res.err, res.err
    # And the rotated root verifies from v1.
    tree = tiny_tree(tmp_path / "tree", "1.0.0")
    bundle = tmp_path / "b.spkb"
    ok(
        "ota", "build", "--daemon-tree", str(tree), "--version", "1.0.0", "--counter", "1",
        "--key", str(k["rel"]), "--out", str(bundle), "--root", str(v2),
    )  # fmt: skip
    assert ok("ota", "verify", str(bundle), "--root", str(k["root"]))["root_version"] == 2


def test_publish_refuses_a_key_that_is_not_a_channel_key(tmp_path: Path) -> None:
    """The same mistake as a wrong root key, for the channel: when the repository holds the
    root, a key it does not name for the channel is refused before anything is signed."""
    k = _root_pki(tmp_path)
    ok("ota", "root", "sign", str(k["root"]), "--key", str(k["root1"]))
    tree = tiny_tree(tmp_path / "tree", "1.0.0")
    bundle = tmp_path / "b.spkb"
    ok(
        "ota", "build", "--daemon-tree", str(tree), "--version", "1.0.0", "--counter", "1",
        "--key", str(k["rel"]), "--out", str(bundle),
    )  # fmt: skip
    repo = tmp_path / "repo"
    argv = f"ota publish --repo {repo} --bundle {bundle} --root {k['root']}".split()
    res = cli.run(*argv, "--key", str(k["rel"]))
    chan_id = load_signing_key(k["chan"]).keyid
    assert res.code == 2 and "not a channel key" in res.err and chan_id in res.err, res.err
    assert not (repo / "v1" / "channels" / "stable.json").exists()
    ok(*argv, "--key", str(k["chan"]))
    # Re-signing later: the root is in the repository now.
    res = cli.run("ota", "publish", "--repo", str(repo), "--key", str(k["root1"]))
    assert res.code == 2 and "not a channel key" in res.err, res.err


def test_build_with_a_root_refuses_a_key_that_is_not_a_release_key(tmp_path: Path) -> None:
    k = _root_pki(tmp_path)
    ok("ota", "root", "sign", str(k["root"]), "--key", str(k["root1"]))
    tree = tiny_tree(tmp_path / "tree", "1.0.0")
    argv = ["ota", "build", "--daemon-tree", str(tree), "--version", "1.0.0", "--counter", "1",
            "--out", str(tmp_path / "b.spkb"), "--root", str(k["root"])]  # fmt: skip
    res = cli.run(*argv, "--key", str(k["chan"]))
    assert res.code == 2 and "not a release key" in res.err, res.err
    assert not (tmp_path / "b.spkb").exists()
    ok(*argv, "--key", str(k["rel"]))


@pytest.mark.parametrize("probation", ["-5", "0", "3601"])
def test_a_probation_nodes_would_refuse_is_a_usage_error(tmp_path: Path, probation: str) -> None:
    """`ota build --probation -5` built the manifest, rejected it and exited 3 (refused):
    the operator's own option is a usage error that says the range, and nothing is
    written."""
    ok("ota", "keygen", str(tmp_path / "rel"))
    tree = tiny_tree(tmp_path / "tree", "1.0.0")
    out = tmp_path / "b.spkb"
    res = cli.run(
        "ota", "build", "--daemon-tree", str(tree), "--version", "1.0.0", "--counter", "1",
        "--key", str(tmp_path / "rel"), "--out", str(out), "--probation", probation,
    )  # fmt: skip
    assert res.code == 2, res
    assert "--probation" in res.err and "3600" in res.err, res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel", "rel.pub", "tree"]


@pytest.mark.parametrize("probation", [-5.0, 0.0, 3601.0, float("nan"), float("inf")])
def test_the_library_build_refuses_a_probation_nodes_would_refuse(
    tmp_path: Path, probation: float
) -> None:
    """The bound is the manifest's (trust/manifest.py) and checked by ota build itself,
    not only by the command: any caller gets the usage error before anything is made."""
    from spk_visor.errors import UsageError  # noqa: PLC0415
    from spk_visor.ota import build as build_mod  # noqa: PLC0415

    ok("ota", "keygen", str(tmp_path / "rel"))
    tree = tiny_tree(tmp_path / "tree", "1.0.0")
    out = tmp_path / "new" / "b.spkb"
    with pytest.raises(UsageError) as e:
        build_mod.build(
            out=out,
            version="1.0.0",
            counter=1,
            keys=[load_signing_key(tmp_path / "rel", None)],
            daemon_tree=tree,
            probation_s=probation,
        )
    assert "--probation" in str(e.value) and "3600" in str(e.value), e.value
    assert not out.parent.exists()


def test_build_makes_the_out_folder_but_no_missing_folder_above_it(tmp_path: Path) -> None:
    """As `ota publish --repo` and `ota keygen`: `--out typo/out/b.spkb` made typo/out."""
    ok("ota", "keygen", str(tmp_path / "rel"))
    tree = tiny_tree(tmp_path / "tree", "1.0.0")
    args = ["ota", "build", "--daemon-tree", str(tree), "--version", "1.0.0", "--counter", "1"]
    args += ["--key", str(tmp_path / "rel")]
    res = cli.run(*args, "--out", str(tmp_path / "typo" / "out" / "b.spkb"))
    assert res.code == 2 and f"{tmp_path / 'typo'} does not exist" in res.err, res
    assert not (tmp_path / "typo").exists()
    assert cli.run(*args, "--out", str(tmp_path / "out" / "b.spkb")).code == 0
