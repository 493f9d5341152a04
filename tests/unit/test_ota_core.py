"""The OTA core without I/O beyond tmp_path: envelopes, roots, manifest rules, config,
journal and lock."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spk_visor.errors import EXIT_CODE_HELP, BusyError, ConfigError, ExitCode, VerificationError
from spk_visor.ota import journal
from spk_visor.ota.nodeconf import NodePaths, load_config
from spk_visor.ota.roots import TrustStore
from spk_visor.trust import dsse, keys, manifest, roots
from tests.support.ota_pki import Pki

PAYLOAD = {"type": manifest.MANIFEST_TYPE}


def _role(threshold: int, *ks: keys.SigningKey) -> dsse.Role:
    return dsse.Role("release", threshold, {k.keyid: k.public for k in ks})


def test_domain_separation_channel_signature_is_not_a_manifest_signature() -> None:
    k = keys.generate()
    env = dsse.new(dsse.CHANNEL_TYPE, PAYLOAD)
    env.sign(k)
    as_manifest = dsse.Envelope(dsse.MANIFEST_TYPE, env.payload, env.signatures)
    with pytest.raises(VerificationError, match="0 valid release signature"):
        dsse.verify(as_manifest, _role(1, k), "manifest")
    assert dsse.verify(env, _role(1, k), "channel") == {k.keyid}


@pytest.mark.parametrize(
    ("threshold", "signed_by", "ok"),
    [
        (1, [0], True),
        (2, [0], False),
        (2, [0, 1], True),
        (2, [0, 0], False),
        (3, [0, 1, 2], True),
        (3, [0, 1], False),
        (2, [0, 3], False),
    ],
)
def test_threshold_counts_distinct_known_keys(
    threshold: int, signed_by: list[int], ok: bool
) -> None:
    ks = [keys.generate() for _ in range(4)]
    role = _role(threshold, *ks[:3])  # key 3 is unknown to the role
    env = dsse.new(dsse.MANIFEST_TYPE, PAYLOAD)
    for i in signed_by:
        env.signatures.append((ks[i].keyid, ks[i].sign(dsse.pae(env.payload_type, env.payload))))
    if ok:
        assert len(dsse.verify(env, role, "m")) == threshold
    else:
        with pytest.raises(VerificationError, match=f"{threshold} required"):
            dsse.verify(env, role, "m")


def test_envelope_caps_and_garbage() -> None:
    with pytest.raises(VerificationError, match="more than 32 signatures"):
        dsse.from_doc(
            {
                "payloadType": dsse.ROOT_TYPE,
                "payload": "",
                "signatures": [{"keyid": "a", "sig": ""}] * 33,
            },
            dsse.ROOT_TYPE,
        )
    with pytest.raises(VerificationError, match="not valid base64"):
        dsse.from_doc(
            {"payloadType": dsse.ROOT_TYPE, "payload": "!!", "signatures": []}, dsse.ROOT_TYPE
        )
    with pytest.raises(VerificationError, match="payload type"):
        dsse.from_doc({"payloadType": "x", "payload": "", "signatures": []}, dsse.ROOT_TYPE)


def test_root_rotation_rules(tmp_path: Path) -> None:
    old = Pki()
    v1 = roots.load_anchor(old.root_env().to_bytes(), "v1")
    new = Pki(root=[keys.generate(), keys.generate()])
    new.thresholds["root"] = 2
    both = new.root_env(2, signers=[old.root[0], *new.root])
    assert roots.verify_successor(v1, both).version == 2
    with pytest.raises(VerificationError, match="old keys"):
        roots.verify_successor(v1, new.root_env(2, signers=new.root))
    with pytest.raises(VerificationError, match="new keys"):
        roots.verify_successor(v1, new.root_env(2, signers=[old.root[0], new.root[0]]))
    with pytest.raises(VerificationError, match="does not follow"):
        roots.verify_successor(v1, new.root_env(3, signers=[old.root[0], *new.root]))
    # The trust store walks forward and never back.
    store = TrustStore(tmp_path / "factory.json", tmp_path / "trust")
    store.factory.write_bytes(old.root_env().to_bytes())
    served = {2: both.to_bytes()}
    newest, added = store.update(served.get)
    assert newest.version == 2 and [r.version for r in added] == [2]
    assert store.load().version == 2
    assert (tmp_path / "trust" / "2.root.json").is_file()


def test_manifest_rules() -> None:
    def doc(**tree: object) -> dict[str, object]:
        base_tree: dict[str, object] = {
            "pack": "sha256:" + "a" * 64,
            "files": [{"p": "bin/x", "m": 0o4777, "s": 3, "h": "b" * 64}],
        }
        base_tree.update(tree)
        return {
            "type": manifest.MANIFEST_TYPE,
            "product": "smechvisor",
            "compatible": ["smechvisor/x86_64"],
            "release": {"version": "1", "counter": 5, "set_floor": 5},
            "components": {
                "d": {
                    "class": "daemon",
                    "version": "1",
                    "service": "smechvisord",
                    "tree": base_tree,
                    "health": {},
                }
            },
            "blobs": [{"id": "sha256:" + "a" * 64, "size": 3}],
        }

    m = manifest.parse(doc())
    assert m.daemon is not None and m.daemon.files[0].mode == 0o755  # setuid masked away
    bad = doc()
    bad["release"] = {"version": "1", "counter": 5, "set_floor": 6}
    with pytest.raises(VerificationError, match="above its own counter"):
        manifest.parse(bad)
    with pytest.raises(VerificationError, match="pack size differs"):
        manifest.parse(doc(files=[{"p": "bin/x", "m": 0o755, "s": 4, "h": "b" * 64}]))
    with pytest.raises(VerificationError, match="twice"):
        manifest.parse(doc(files=[{"p": "a", "m": 0, "s": 1, "h": "b" * 64}] * 2))
    for p in ("a/../b", "./a", "a//b", "", "a\nb", "a b"):
        with pytest.raises(VerificationError, match="unsafe path"):
            manifest.parse(doc(files=[{"p": p, "m": 0, "s": 3, "h": "b" * 64}]))


def test_node_config_errors_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = NodePaths(tmp_path)
    assert load_config(paths).channel == "stable"  # no file: defaults
    paths.conf.parent.mkdir(parents=True)
    paths.conf.write_text(
        'channel = "beta"\nbase_urls = ["https://a/", "https://b"]\n[slots]\na = "/dev/x"\n'
    )
    cfg = load_config(paths)
    assert (
        cfg.channel == "beta"
        and cfg.base_urls == ("https://a", "https://b")
        and cfg.slots.a == "/dev/x"
    )
    paths.conf.write_text("chanel = 1\n")
    with pytest.raises(ConfigError, match="unknown key `chanel`"):
        load_config(paths)
    paths.conf.write_text("apply_daemon = 1\n")
    with pytest.raises(ConfigError, match="true or false"):
        load_config(paths)


@pytest.mark.parametrize(
    "url", ["http://[::1", "ftp://mirror/ota", "updates.example.net", "http://h:99999", "https://"]
)
def test_a_base_url_that_is_not_an_http_url_is_a_config_error(tmp_path: Path, url: str) -> None:
    """A typo in base_urls was found only at fetch time: an internal error (a broken
    [IPv6] host) or exit 7, "transient: the next run retries", for a file only the admin
    can fix. Every run from cron would have failed the same way."""
    paths = NodePaths(tmp_path)
    paths.conf.parent.mkdir(parents=True)
    paths.conf.write_text(f'base_urls = ["https://good.example/ota", "{url}"]\n')
    with pytest.raises(ConfigError, match="base_urls") as info:
        load_config(paths)
    assert info.value.exit_code == ExitCode.USAGE
    assert url in info.value.message and "https://" in info.value.message


def test_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    paths = NodePaths(tmp_path)
    with journal.locked(paths, "apply"):
        assert journal.lock_holder(paths) == f"{os.getpid()} apply"
        code = (
            "import sys; from pathlib import Path;"
            "from spk_visor.ota import journal; from spk_visor.ota.nodeconf import NodePaths;"
            "from spk_visor.errors import BusyError\n"
            "try:\n with journal.locked(NodePaths(Path(sys.argv[1])), 'pull'): sys.exit(0)\n"
            "except BusyError as e: print(e); sys.exit(6)"
        )
        res = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert res.returncode == 6 and "apply" in res.stdout
    with journal.locked(paths, "again"):
        pass
    assert journal.lock_holder(paths) is None
    with journal.locked(paths, "a"), pytest.raises(BusyError), journal.locked(paths, "b"):
        pass


def test_journal_transitions_and_breaker(tmp_path: Path) -> None:
    j = journal.Journal(NodePaths(tmp_path))
    j.begin("daemon", "staging", manifest="m")
    for i in range(journal.MAX_TRANSITIONS + 1):
        j.set("daemon", "probation" if i % 2 else "switching")
    assert j.over_budget("daemon")
    assert (
        json.loads((tmp_path / "var/lib/spk-visor/ota/state.json").read_text())["daemon"][
            "manifest"
        ]
        == "m"
    )
    j.begin("daemon", "staging")
    assert not j.over_budget("daemon")


def test_exit_code_77_is_documented() -> None:
    assert int(ExitCode.UNCHANGED) == 77 and "unchanged" in EXIT_CODE_HELP[ExitCode.UNCHANGED]


def test_root_expiry_check() -> None:
    pki = Pki()
    root = roots.load_anchor(pki.root_env(expires=dt.timedelta(days=1)).to_bytes(), "r")
    roots.check_expiry(root, dt.datetime.now(dt.UTC))
    with pytest.raises(VerificationError, match="expired"):
        roots.check_expiry(root, dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
