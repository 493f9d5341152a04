"""The admin's SSH keys for a new node, and the release a node sends of its own: checked
on the donor before anyone is contacted, and again by the target's PLAN validation."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from spk_visor.deploy import authkeys, donor
from spk_visor.deploy.install import PlanRefused, validate_plan
from spk_visor.errors import ExitCode, SpkVisorError
from spk_visor.ota.nodeconf import NodePaths
from spk_visor.ota.store import BlobStore
from spk_visor.trust import roots
from tests.support.cli import run
from tests.support.deploy_units import fake_disk
from tests.support.ota_pki import Pki, make_bundle, signed_manifest
from tests.support.sshkeys import public_line


def _wire(kind: str) -> str:
    """A base64 SSH wire blob whose embedded type is `kind`."""
    name = kind.encode()
    return base64.b64encode(
        struct.pack(">I", len(name)) + name + struct.pack(">I", 1) + b"x"
    ).decode()


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "ecdsa"])
def test_real_keys_pass_and_are_normalised(kind: str) -> None:
    line = public_line(kind, "admin@desk")
    assert authkeys.validate(f"\n# the admin\n  {line}  \n\n") == f"{line}\n"
    bare = " ".join(line.split()[:2])
    assert authkeys.validate(bare) == f"{bare}\n"


def test_several_keys_keep_their_order() -> None:
    lines = [public_line("ed25519", "one"), public_line("ecdsa", "two")]
    assert authkeys.validate("\n".join(lines)) == "".join(f"{x}\n" for x in lines)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "no public key"),
        ("# only a comment\n\n", "no public key"),
        ('command="/bin/sh" ' + public_line(), "options before the key"),
        ("no-pty," + public_line(), "options before the key"),
        ('from="10.0.0.1" ' + public_line(), "options before the key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n", "not an OpenSSH public key"),
        ("ssh-dss " + _wire("ssh-dss"), "unknown key type"),
        ("ssh-ed25519", "without its key"),
        ("ssh-ed25519 not_base64!!", "not base64"),
        ("ssh-ed25519 QUFB=QUFB", "not base64"),
        ("ssh-rsa " + _wire("ssh-ed25519"), "does not hold a ssh-rsa key"),
        ("ssh-ed25519 " + base64.b64encode(b"\x00\x00").decode(), "does not hold"),
        (public_line() + " bad\x07comment", "printable ASCII"),
        (public_line("ed25519", "x" * 300), "at most"),
        ("\n".join(public_line() for _ in range(33)), "more than 32 keys"),
        (public_line() + " " + "y" * 20000, "bytes of keys"),
    ],
)
def test_bad_keys_say_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        authkeys.validate(text)


def test_a_bad_line_is_named_by_its_number() -> None:
    with pytest.raises(ValueError, match="line 3: "):
        authkeys.validate(f"{public_line()}\n\nssh-ed25519 AAAA\n")


# ---- the target checks again --------------------------------------------------------


def _plan(pki: Pki, disk: Any, **kw: Any) -> dict[str, Any]:
    from tests.unit.test_deploy_plan import _payload  # noqa: PLC0415

    plan: dict[str, Any] = {
        "manifest": signed_manifest(_payload(), pki.release).to_doc(),
        "disk": {"serial": disk.serial, "size": disk.size},
        "layout": "ab",
        "hostname": "node-1",
        "confirm_wipe_serial": None,
    }
    plan.update(kw)
    return plan


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def test_plan_carries_keys_and_the_target_checks_them(pki: Pki) -> None:
    root = roots.load_anchor(pki.root_env().to_bytes(), "test root")
    disk = fake_disk()
    line = public_line()
    assert validate_plan(_plan(pki, disk), [disk], root).authorized_keys is None
    resolved = validate_plan(_plan(pki, disk, authorized_keys=f"  {line}\n"), [disk], root)
    assert resolved.authorized_keys == f"{line}\n"
    for bad in ('command="reboot" ' + line, "ssh-rsa " + _wire("ssh-ed25519"), "", 7, [line]):
        with pytest.raises(PlanRefused) as caught:
            validate_plan(_plan(pki, disk, authorized_keys=bad), [disk], root)
        assert caught.value.reason == "bad_authorized_keys", bad
    with pytest.raises(PlanRefused, match="unknown keys"):
        validate_plan(_plan(pki, disk, authorized_keyz=line), [disk], root)


# ---- the donor: its own checks before any contact ------------------------------------


def test_bad_key_file_exits_2_before_anything(tmp_path: Path) -> None:
    bad = tmp_path / "id.pub"
    bad.write_text('command="sh" ' + public_line() + "\n")
    # Neither the bundle (absent) nor the target (nothing listens) is reached.
    missing = tmp_path / "absent.spkb"
    args = ["--bundle", str(missing), "--target", "127.0.0.1:9"]
    result = run("deploy", "send", "42-K7QX9", "--authorized-key", str(bad), *args)
    assert result.code == 2, result
    assert f"--authorized-key {bad}: line 1: options before the key" in result.err
    result = run("deploy-system-img-copy", "42-K7QX9", "--authorized-key", str(missing), *args)
    assert result.code == 2 and f"--authorized-key {missing}" in result.err, result
    binary = tmp_path / "id_ed25519"
    binary.write_bytes(b"\xff\xfe\x00")
    result = run("deploy", "send", "42-K7QX9", "--authorized-key", str(binary), *args)
    assert result.code == 2 and "OpenSSH public key file" in result.err, result


# ---- the node's own release -----------------------------------------------------------


def _node_with_store(tmp: Path, pki: Pki) -> tuple[NodePaths, donor.Payload]:
    """A node's OTA state as `ota apply` or a deploy leaves it: the signed manifest and its
    blobs in the store, installed.json naming the manifest."""
    result = make_bundle(tmp, pki, version="3.1.0", counter=7)
    bundle = donor.open_bundle(result.bundle)
    paths = NodePaths(tmp / "node")
    store = BlobStore(paths)
    store.ensure()
    store.save_manifest(result.manifest_sha256, result.manifest_path.read_bytes())
    with result.bundle.open("rb") as f:
        for blob_id, size in bundle.blobs.items():
            f.seek(bundle.offsets[blob_id])
            store.ingest(f, blob_id, size)
    paths.state_dir.joinpath("installed.json").write_text(
        json.dumps({"manifest": result.manifest_sha256, "counter": 7, "version": "3.1.0"})
    )
    return paths, bundle


def test_node_release_is_the_signed_one_from_the_store(tmp_path: Path, pki: Pki) -> None:
    paths, bundle = _node_with_store(tmp_path, pki)
    payload = donor.open_node_release(paths)
    assert payload.manifest_sha256 == bundle.manifest_sha256
    assert payload.manifest_doc == bundle.manifest_doc  # the envelope, signatures and all
    assert payload.blobs == bundle.blobs
    assert payload.describe() == {
        "version": "3.1.0",
        "counter": 7,
        "manifest_sha256": bundle.manifest_sha256,
        "source": "this node's OTA store",
    }
    with bundle.path.open("rb") as f:
        for blob_id, size in bundle.blobs.items():
            f.seek(bundle.offsets[blob_id])
            assert payload.file_of(blob_id).read_bytes() == f.read(size)


def test_a_missing_blob_is_named_with_the_way_to_get_it(tmp_path: Path, pki: Pki) -> None:
    paths, bundle = _node_with_store(tmp_path, pki)
    blob_id = next(iter(bundle.blobs))
    BlobStore(paths).path(blob_id).unlink()
    with pytest.raises(SpkVisorError) as caught:
        donor.open_node_release(paths)
    assert caught.value.exit_code == ExitCode.OPERATOR_NEEDED
    text = str(caught.value) + " " + str(caught.value.hint)
    assert blob_id in text and "3.1.0" in text
    assert "ota pull" in text and "--bundle" in text
    # The CLI says the same, before contacting anyone.
    env = {"SPK_VISOR_OTA_SYSROOT": str(paths.sysroot)}
    result = run("deploy-system-img-copy", "42-K7QX9", "--target", "127.0.0.1:9", env=env)
    assert result.code == 9, result
    assert blob_id in result.err and "ota pull" in result.err


def test_a_machine_without_a_release_says_to_pass_a_bundle(tmp_path: Path) -> None:
    env = {"SPK_VISOR_OTA_SYSROOT": str(tmp_path)}
    result = run("deploy-system-img-copy", "42-K7QX9", "--target", "127.0.0.1:9", env=env)
    assert result.code == 2, result
    assert "no installed release to send" in result.err and "--bundle FILE" in result.err
