"""A user's mistake with a file or folder never reaches "internal error" in `ota` and
`deploy`: it exits 2 and says what is wrong with which path, and what to do.

Each case is a mistake an admin makes on the first day: a key folder that does not exist
yet, a path that names a folder, a file that is missing or unreadable. A failure that is
not about a path the user named must still be reported as internal (exit 1).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spk_visor.errors import ExitCode, user_path_error
from spk_visor.trust import keys
from tests.support import cli
from tests.support.ota_pki import Node, Pki, make_bundle, tiny_tree
from tests.support.prereq import need_root

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def one_error(res: cli.Result) -> str:
    assert "internal error" not in res.err, res.err
    assert res.code == ExitCode.USAGE, res
    return res.err


def test_keygen_creates_missing_key_folders_0700(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's first OTA command, in a fresh folder."""
    monkeypatch.chdir(tmp_path)
    res = cli.run("ota", "keygen", "keys/root1")
    assert res.code == 0, res.err
    assert (tmp_path / "keys" / "root1").is_file() and (tmp_path / "keys" / "root1.pub").is_file()
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    # Only the key's own folder is made: a missing folder above it is a typo to fix.
    err = one_error(cli.run("ota", "keygen", str(tmp_path / "a" / "b" / "k")))
    assert f"{tmp_path / 'a'} does not exist" in err and "mkdir" in err, err
    assert not (tmp_path / "a").exists()
    # A folder that exists already keeps its mode.
    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)
    assert cli.run("ota", "keygen", str(tmp_path / "open" / "k")).code == 0
    assert stat.S_IMODE((tmp_path / "open").stat().st_mode) == 0o755


def test_keygen_under_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    err = one_error(cli.run("ota", "keygen", str(tmp_path / "afile" / "k")))
    assert str(tmp_path / "afile") in err and "not a folder" in err


def _keys(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("root", "rel", "chan"):
        assert cli.run("ota", "keygen", str(tmp_path / "k" / name)).code == 0
        out[name] = tmp_path / "k" / name
    return out


def role_keys(k: dict[str, Path]) -> list[str]:
    """--root-key, --release-key and --channel-key options for the keys of _keys."""
    pub = {role: f"{path}.pub" for role, path in k.items()}
    return ["--root-key", pub["root"], "--release-key", pub["rel"], "--channel-key", pub["chan"]]


def test_missing_and_wrong_kind_of_files(tmp_path: Path) -> None:
    k = _keys(tmp_path)
    missing = tmp_path / "missing.json"
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = [
        ["ota", "root", "sign", str(missing), "--key", str(k["root"])],
        ["ota", "root", "sign", str(folder), "--key", str(k["root"])],
        ["ota", "verify", str(missing), "--root", str(missing)],
        ["ota", "bundle", "explode", str(missing), "--repo", str(tmp_path / "repo")],
        f"ota bundle pack --repo {tmp_path}/norepo --manifest {'ab' * 32} -o {tmp_path}/x".split(),
        f"ota publish --repo {tmp_path}/repo --key {k['chan']} --bundle {missing}".split(),
        ["ota", "root", "rotate", str(missing), "--out", f"{tmp_path}/r2.json", *role_keys(k)],
    ]
    for argv in cases:
        err = one_error(cli.run(*argv))
        assert "missing.json" in err or "norepo" in err or "folder" in err, (argv, err)
        assert "\n" in err.strip() or "give" in err or "check" in err, (argv, err)


def test_keygen_with_an_empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ota keygen ""` (an unset shell variable) was an internal error (Path('.'))."""
    monkeypatch.chdir(tmp_path)
    err = one_error(cli.run("ota", "keygen", ""))
    assert "PRIVATE_KEY" in err and "keygen keys/" in err
    assert list(tmp_path.iterdir()) == []


def test_signing_with_the_public_key_or_a_folder_says_which_file_to_give(tmp_path: Path) -> None:
    """`--key keys/root1.pub` said "chmod 600 keys/root1.pub", and `--key ""` (the current
    folder) "chmod 600 .": neither is the fix, the private key file is."""
    k = _keys(tmp_path)
    root = tmp_path / "root.json"
    assert cli.run("ota", "root", "init", "-o", str(root), *role_keys(k)).code == 0
    before = root.read_bytes()
    err = one_error(cli.run("ota", "root", "sign", str(root), "--key", f"{k['root']}.pub"))
    assert "chmod" not in err and "public key" in err and f"--key {k['root']}\n" in err + "\n"
    for folder in ("", str(tmp_path)):
        err = one_error(cli.run("ota", "root", "sign", str(root), "--key", folder))
        assert "chmod" not in err and "folder" in err, err
    assert root.read_bytes() == before


def test_root_init_into_a_missing_folder_and_onto_a_folder(tmp_path: Path) -> None:
    k = _keys(tmp_path)
    keys = role_keys(k)
    err = one_error(cli.run("ota", "root", "init", "--out", str(tmp_path / "no" / "r.json"), *keys))
    assert str(tmp_path / "no") in err
    (tmp_path / "dir.json").mkdir()
    err = one_error(cli.run("ota", "root", "init", "--out", str(tmp_path / "dir.json"), *keys))
    assert "dir.json" in err


def test_unreadable_files_without_dac_override(tmp_path: Path) -> None:
    """Permission denied, as a non-root admin meets it: run the CLI as root without the
    capabilities that let root read any file."""
    need_root()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    k = _keys(tmp_path)
    (tmp_path / "locked").mkdir(mode=0o500)
    (tmp_path / "locked").chmod(0o500)
    base = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]
    env = {**os.environ, "SPK_VISOR_CONFIG": "/nonexistent"}
    for argv, path in (
        (["ota", "keygen", str(tmp_path / "locked" / "k")], "locked"),
        (["ota", "root", "init", "--out", f"{tmp_path}/locked/r.json", *role_keys(k)], "locked"),
    ):
        proc = subprocess.run(
            [*base, sys.executable, "-m", "spk_visor", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert proc.returncode == ExitCode.USAGE, (argv, proc.stderr)
        assert "internal error" not in proc.stderr and path in proc.stderr, proc.stderr
        assert "ermission" in proc.stderr, proc.stderr


def test_only_paths_the_user_named_are_their_mistake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mapping is for paths on the command line (and what is beside or under them);
    an OSError about any other path stays an internal error."""
    named = ["ota", "keygen", "keys/root1", "--out=out/x.spkb", "--repo", str(tmp_path / "r")]
    monkeypatch.chdir(tmp_path)

    def err(path: str, code: int = errno.ENOENT) -> OSError:
        return OSError(code, os.strerror(code), path)

    related = ["keys/root1", "keys", str(tmp_path / "keys" / "root1.pub"), "keys/.root1.tmp"]
    related += ["out", "out/x.manifest.json", f"{tmp_path}/r/v1/blobs/x"]
    for path in related:
        mapped = user_path_error(err(path), named)
        assert mapped is not None and mapped.exit_code == ExitCode.USAGE, path
    for path in ("/var/lib/spk-visor/ota/state.json", "/etc/passwd", str(tmp_path / "other")):
        assert user_path_error(err(path), named) is None, path
    assert user_path_error(OSError(errno.EIO, "I/O error"), named) is None  # no path at all
    eisdir = user_path_error(err("keys/root1", errno.EISDIR), named)
    assert eisdir is not None and "folder" in eisdir.diagnostics()


def test_a_bug_about_another_path_is_still_internal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_a: object, **_k: object) -> object:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nonexistent/lib")

    monkeypatch.setattr(keys, "generate", broken)
    res = cli.run("ota", "keygen", str(tmp_path / "k"))
    assert res.code == ExitCode.INTERNAL and "internal error" in res.err


def test_deploy_send_with_a_folder_for_bundle(tmp_path: Path) -> None:
    err = one_error(
        cli.run("deploy", "send", "12-ABCDE", "--bundle", str(tmp_path), "--target", "127.0.0.1:9")
    )
    assert str(tmp_path) in err
    json.dumps(err)


def test_a_file_that_is_not_a_root_document(tmp_path: Path) -> None:
    """Any file given where a root document belongs: exit 2 naming the file and what it
    should be (it was exit 3, "signature envelope is not valid JSON", with no file name)."""
    k = _keys(tmp_path)
    junk = tmp_path / "junk.json"
    junk.write_text("{")
    pub = f"{k['root']}.pub"
    bundle = tmp_path / "b.spkb"
    bundle.write_bytes(b"SPKOTA\0\1")
    cases = [
        ["ota", "verify", str(bundle), "--root", str(junk)],
        ["ota", "verify", str(bundle), "--root", pub],
        ["ota", "root", "sign", str(junk), "--key", str(k["root"])],
        ["ota", "root", "rotate", pub, "--out", f"{tmp_path}/r2.json", *role_keys(k)],
        f"ota publish --repo {tmp_path}/repo --key {k['chan']} --root {junk}".split(),
    ]
    for argv in cases:
        err = one_error(cli.run(*argv))
        assert "not a root document" in err and ("junk.json" in err or "root.pub" in err), err
        assert not (tmp_path / "r2.json").exists()


def test_build_onto_a_folder_names_it_and_leaves_nothing(tmp_path: Path) -> None:
    _keys(tmp_path)
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "smechvisord").write_text("#!/bin/sh\n")
    (tree / "bin" / "smechvisord").chmod(0o755)
    (tree / "lib" / "smechvisord").mkdir(parents=True)
    (tree / "lib" / "smechvisord" / "version.py").write_text('VERSION = "1.0"\n')
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    err = one_error(
        cli.run(
            "ota",
            "build",
            "--version",
            "1.0",
            "--counter",
            "1",
            "--key",
            str(tmp_path / "k" / "rel"),
            "--daemon-tree",
            str(tree),
            "-o",
            str(out),
        )
    )
    assert f"{out} is a folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _as_nobody() -> list[str]:
    """argv prefix running this checkout's CLI as user nobody, or a skip."""
    need_root()
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("runuser (util-linux) is not installed")
    # The venv's interpreter may live under root's home; the system's reads the same code.
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    paths = [str(Path(__file__).resolve().parents[2]), *sys.path[1:]]
    prefix = [
        runuser,
        "-u",
        "nobody",
        "--",
        "env",
        "HOME=/tmp",
        f"PYTHONPATH={':'.join(p for p in paths if p)}",
        python,
    ]
    probe = subprocess.run(
        [*prefix, "-c", "import spk_visor.cli"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this checkout: {probe.stderr.strip()[-200:]}")
    return prefix


def test_node_commands_as_a_non_root_user(pki_sysroot: Path) -> None:
    """On a node, `ota pull` by a user who may not take the OTA lock: exit 2, saying to
    run it as root (it was an internal error); reading status works."""
    prefix = _as_nobody()
    env = {"SPK_VISOR_OTA_SYSROOT": str(pki_sysroot), "SPK_VISOR_CONFIG": "/nonexistent"}
    envs = [f"{k}={v}" for k, v in env.items()]
    run = [prefix[0], *prefix[1:5], *envs, *prefix[5:]]
    for argv in (["ota", "pull"], ["ota", "recover"], ["ota", "commit"]):
        proc = subprocess.run(
            [*run, "-m", "spk_visor", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == ExitCode.USAGE, (argv, proc.stderr)
        assert "internal error" not in proc.stderr and "as root" in proc.stderr, proc.stderr
    status = subprocess.run(
        [*run, "-m", "spk_visor", "ota", "status"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert status.returncode == 0, status.stderr


def test_reading_a_root_only_ota_state_as_a_user(pki_sysroot: Path) -> None:
    """After the first update the node's OTA state folder is 0700 root: `ota status` and
    `ota history` by an admin without sudo were internal errors (PermissionError)."""
    state = pki_sysroot / "var" / "lib" / "spk-visor" / "ota"
    state.mkdir(parents=True)
    (state / "history.jsonl").write_text('{"event": "applied"}\n')
    state.parent.chmod(0o700)
    prefix = _as_nobody()
    envs = [f"SPK_VISOR_OTA_SYSROOT={pki_sysroot}", "SPK_VISOR_CONFIG=/nonexistent"]
    run = [prefix[0], *prefix[1:5], *envs, *prefix[5:]]
    for argv in (["ota", "status"], ["ota", "history"]):
        proc = subprocess.run(
            [*run, "-m", "spk_visor", *argv], capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        assert proc.returncode == ExitCode.USAGE, (argv, proc.stderr)
        assert "internal error" not in proc.stderr and "as root" in proc.stderr, proc.stderr


@pytest.fixture
def pki_sysroot() -> Iterator[Path]:
    """A node sysroot others may read (pytest's tmp_path is root's alone), removed after."""
    root = Path(tempfile.mkdtemp(prefix="spk-nonroot-", dir="/tmp"))
    try:
        root.chmod(0o755)
        conf = root / "etc" / "spk-visor" / "ota.conf"
        conf.parent.mkdir(parents=True)
        conf.write_text('base_urls = ["http://127.0.0.1:9"]\n')
        for folder in (root, *root.rglob("*")):
            folder.chmod(0o755 if folder.is_dir() else 0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("where", ["missing-folder/base.img", "a-folder"])
def test_image_build_checks_its_output_path_before_building(tmp_path: Path, where: str) -> None:
    """`image build -o /nonexistent/x.img` ran the whole mmdebstrap build (minutes) and only
    then found it could not write the image: check --out first."""
    k = _keys(tmp_path)
    root = tmp_path / "root.json"
    assert cli.run("ota", "root", "init", "-o", str(root), *role_keys(k)).code == 0
    assert cli.run("ota", "root", "sign", str(root), "--key", str(k["root"])).code == 0
    (tmp_path / "a-folder").mkdir()
    out = tmp_path / where
    started = time.monotonic()
    res = cli.run("image", "build", "--root", str(root), "-o", str(out))
    err = one_error(res)
    assert "--out" in err and str(out) in err, err
    assert time.monotonic() - started < 30, "it built before checking --out"


def test_push_of_a_key_or_root_document_contacts_no_node(tmp_path: Path) -> None:
    """`ota push root.json` (or a key: the wrong file from the same folder) connected to
    every node and reported each one's failure; it is one local mistake, said once."""
    k = _keys(tmp_path)
    empty = tmp_path / "empty.spkb"
    empty.write_bytes(b"")
    for wrong in (Path(f"{k['root']}.pub"), k["rel"], empty):
        res = cli.run("--ssh", "root@127.0.0.1:1", "ota", "push", str(wrong))
        err = one_error(res)
        assert str(wrong) in err and "not an OTA bundle" in err, err
        assert "127.0.0.1" not in res.out + err


@pytest.mark.parametrize("name", ["../floor", "stable/beta", "", ".hidden", "a b"])
def test_a_channel_name_that_is_not_a_name_is_refused(tmp_path: Path, name: str) -> None:
    """`--channel ../floor` became the path channels/../floor.json: in the repository that
    `ota publish` writes, and in the node's state folder that `ota pull` writes."""
    k = _keys(tmp_path)
    repo = tmp_path / "repo"
    res = cli.run("ota", "publish", "--repo", str(repo), "--key", str(k["chan"]),
                  "--channel", name)  # fmt: skip
    assert "--channel" in one_error(res)
    assert not repo.exists()
    sysroot = tmp_path / "node"
    conf = sysroot / "etc" / "spk-visor" / "ota.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text('base_urls = ["http://127.0.0.1:9"]\n')
    env = {"SPK_VISOR_OTA_SYSROOT": str(sysroot)}
    assert "--channel" in one_error(cli.run("ota", "pull", "--channel", name, env=env))
    conf.write_text(f'base_urls = ["http://127.0.0.1:9"]\nchannel = "{name}"\n')
    assert "channel" in one_error(cli.run("ota", "pull", env=env))
    assert sorted(p.name for p in sysroot.rglob("*")) == ["etc", "ota.conf", "spk-visor"]


def test_push_of_any_file_without_the_bundle_magic_contacts_no_node(tmp_path: Path) -> None:
    """`ota push /etc/passwd` streamed the file to every node: a file that does not start
    with the bundle magic (spk_visor/ota/bundle.py) is refused here, exit 2, before any
    connection is made."""
    import socket  # noqa: PLC0415

    text = tmp_path / "notes.txt"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n" * 50)
    noise = tmp_path / "noise.spkb"
    noise.write_bytes(os.urandom(4096))
    node = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        node.bind(("127.0.0.1", 0))
        node.listen(8)
        node.setblocking(False)
        port = node.getsockname()[1]
        for wrong in (Path("/etc/passwd"), text, noise):
            res = cli.run("--ssh", f"root@127.0.0.1:{port}", "ota", "push", str(wrong))
            err = one_error(res)
            assert str(wrong) in err and "not an OTA bundle" in err, err
            with pytest.raises(BlockingIOError):
                node.accept()[0].close()
    finally:
        node.close()


def test_a_sysroot_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    """`SPK_VISOR_OTA_SYSROOT=/nonexistent ota status` reported a fresh node: a typo in
    the variable must not read as "nothing installed here"."""
    for missing in (tmp_path / "no-such-root", tmp_path / "a-file"):
        if missing.name == "a-file":
            missing.write_text("x")
        env = {"SPK_VISOR_OTA_SYSROOT": str(missing)}
        for argv in (["ota", "status"], ["--json", "ota", "status"]):
            res = cli.run(*argv, env=env)
            err = one_error(res)
            assert "SPK_VISOR_OTA_SYSROOT" in err and str(missing) in err, err
            if "--json" in argv:
                assert json.loads(res.out)["error"]["exit_code"] == ExitCode.USAGE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_named_file_that_is_not_a_bundle_is_the_users_mistake(
    tmp_path: Path, ota_node: Node, ota_pki: Pki
) -> None:
    """`ota check --bundle FILE` on random bytes, an empty file, a text file or a key
    said "bad magic" or "bundle truncated in the magic ... copy the bundle again" and
    exited 3 (refused), and a folder said "Is a directory" and nothing to do. The wrong
    file is the user's mistake: exit 2, naming it and the file to give. A real bundle
    whose signature does not verify is still refused (3)."""
    wrong = {
        "empty": b"",
        "noise": os.urandom(4096),
        "notes.txt": b"hello\n",
        "key.pem": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    }
    for name, data in wrong.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder").mkdir()
    root = tmp_path / "root.json"
    root.write_bytes(ota_pki.root_env().to_bytes())
    before = ota_node.tree_digest()
    for name in [*wrong, "folder"]:
        path = str(tmp_path / name)
        for argv in (
            ["ota", "check", "--bundle", path],
            ["ota", "apply", "--bundle", path],
            ["ota", "inspect", path],
            ["ota", "verify", path, "--root", str(root)],
        ):
            err = one_error(cli.run(*argv, env=ota_node.env))
            assert f"{path} is not an OTA bundle" in err, (argv, err)
            assert "ota build" in err, (argv, err)
    assert ota_node.tree_digest() == before
    stranger = make_bundle(tmp_path, ota_pki, tree=tiny_tree(tmp_path / "t", "0.2.0"))
    raw = bytearray(stranger.bundle.read_bytes())
    at = raw.index(b'"sig":"') + len('"sig":"') + 10
    raw[at] = ord("B") if raw[at] != ord("B") else ord("C")
    stranger.bundle.write_bytes(bytes(raw))
    res = cli.run("ota", "check", "--bundle", str(stranger.bundle), env=ota_node.env)
    assert res.code == ExitCode.REFUSED and "signature" in res.err, res
    assert ota_node.tree_digest() == before


def test_publish_makes_the_repository_folder_but_no_missing_folder_above_it(
    tmp_path: Path,
) -> None:
    """`ota publish --repo /srv/updaets/repo` made /srv/updaets and all below it: a typo
    silently became a new tree. The repository folder itself is made on a first publish
    (docs/ota.md: `--repo updates`); a missing folder above it is refused, nothing made."""
    k = _keys(tmp_path)
    bundle = make_bundle(tmp_path, Pki(), tree=tiny_tree(tmp_path / "t", "0.2.0")).bundle
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (
        ["ota", "publish", "--key", str(k["chan"]), "--bundle", str(bundle)],
        ["ota", "bundle", "explode", str(bundle)],
    ):
        err = one_error(cli.run(*argv, "--repo", str(tmp_path / "typo" / "repo")))
        assert f"{tmp_path / 'typo'} does not exist" in err and "mkdir" in err, (argv, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    res = cli.run(
        "ota", "publish", "--repo", str(tmp_path / "repo"), "--key", str(k["chan"]),
        "--bundle", str(bundle),
    )  # fmt: skip
    assert res.code == 0, res
    assert (tmp_path / "repo" / "v1" / "channels" / "stable.json").is_file()


def test_missing_files_in_the_docs_commands_say_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newcomer's pass over the docs' commands: a missing file said only "No such file
    or directory" (a bundle, a public key), and `image build --root` said to pass
    --trust-root, which image build does not have. Each names the file and what to do."""
    monkeypatch.chdir(tmp_path)
    k = _keys(tmp_path)
    cases = [
        (["ota", "check", "--bundle", "spk-2.5.0.spkb"], "ota build"),
        (["ota", "inspect", "spk-2.5.0.spkb"], "ota build"),
        (["deploy", "send", "42-K7QX9", "--bundle", "spk-2.5.0.spkb"], "ota build"),
        (
            [
                "ota",
                "root",
                "init",
                "-o",
                "r.json",
                "--root-key",
                "keys/root4.pub",
                "--release-key",
                f"{k['rel']}.pub",
                "--channel-key",
                f"{k['chan']}.pub",
            ],
            "ota keygen keys/root4",
        ),
        (["image", "build", "--root", "root.json", "--out", "b.img"], "--root"),
        (["ota", "publish", "--repo", "updates", "--key", "nokey"], "the private key file"),
    ]
    for argv, hint in cases:
        err = one_error(cli.run(*argv))
        lines = err.splitlines()
        assert len(lines) == 2 and hint in lines[1], (argv, err)
        assert "--trust-root" not in err, (argv, err)
