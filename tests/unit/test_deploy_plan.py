"""PLAN validation, inventory judgement, layout and grub.cfg: no root, nothing touched."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import zstandard

from spk_visor.deploy import bootloader, donor, install, receiver
from spk_visor.deploy.install import PlanRefused, plan_layout, validate_plan
from spk_visor.deploy.inventory import Disk, disk_from_lsblk, judge
from spk_visor.errors import ExitCode, SpkVisorError
from spk_visor.install.layout import BIOS_BOOT_TYPE, MIB
from spk_visor.ota import build
from spk_visor.ota.nodeconf import NodePaths
from spk_visor.ota.store import BlobStore
from spk_visor.trust import dsse, keys, roots
from spk_visor.trust.manifest import ImageComponent
from spk_visor.trust.roots import Root
from tests.support.deploy_units import fake_disk
from tests.support.ota_pki import Pki, signed_manifest

GIB = 1 << 30
SERIAL = "S3EVNX0K123456"
IMAGE_RAW = 24 * MIB


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _payload(
    *, files: list[dict[str, Any]] | None = None, links: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    files = (
        files
        if files is not None
        else [{"p": "bin/smechvisord", "m": 0o755, "s": 10, "h": _hex("f")}]
    )
    pack = build.Blob(f"sha256:{_hex('pack')}", sum(f["s"] for f in files), Path("pack"))
    image = build.Blob(f"sha256:{_hex('image')}", 5 * MIB, Path("image"))
    tree = {"pack": pack.id, "encoding": "identity", "files": files, "symlinks": links or []}
    spec = {"blob": image.id, "encoding": "zstd", "raw_size": IMAGE_RAW, "raw_sha256": _hex("raw")}
    return build.make_manifest(
        version="1.0.0", counter=1, set_floor=0, tree=tree, image=spec, blobs=[pack, image]
    )


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture(scope="module")
def root(pki: Pki) -> Root:
    return roots.load_anchor(pki.root_env().to_bytes(), "test root")


def _disk(**kw: Any) -> Disk:
    return fake_disk(**kw)


def _plan(pki: Pki, disk: Disk, **kw: Any) -> dict[str, Any]:
    plan: dict[str, Any] = {
        "manifest": signed_manifest(_payload(), pki.release).to_doc(),
        "disk": {"serial": disk.serial, "size": disk.size},
        "layout": "ab",
        "hostname": "node-1",
        "confirm_wipe_serial": None,
    }
    plan.update(kw)
    return plan


def _refused(plan: dict[str, Any], disks: list[Disk], root: Root) -> str:
    with pytest.raises(PlanRefused) as caught:
        validate_plan(plan, disks, root)
    return caught.value.reason


def test_good_plan_resolves(pki: Pki, root: Root) -> None:
    disk = _disk()
    other = _disk(name="sdb", path="/dev/sdb", serial="OTHER")
    resolved = validate_plan(_plan(pki, disk), [other, disk], root)
    assert resolved.disk is disk
    assert resolved.hostname == "node-1"
    assert resolved.manifest.image is not None and resolved.manifest.image.raw_size == IMAGE_RAW
    assert resolved.layout.slot_mib == 16 * 1024  # the default on a 256 GiB disk
    assert not resolved.wipe_confirmed


def test_wrong_serial_or_size(pki: Pki, root: Root) -> None:
    disk = _disk()
    plan = _plan(pki, disk)
    plan["disk"] = {"serial": "NOPE", "size": disk.size}
    assert _refused(plan, [disk], root) == "disk_not_found"
    plan["disk"] = {"serial": SERIAL, "size": disk.size + 512}
    assert _refused(plan, [disk], root) == "disk_not_found"


def test_two_disks_same_serial_is_ambiguous(pki: Pki, root: Root) -> None:
    a, b = _disk(), _disk(name="sdb", path="/dev/sdb")
    assert _refused(_plan(pki, a), [a, b], root) == "disk_ambiguous"


def test_too_small(pki: Pki, root: Root) -> None:
    disk = _disk(size=700 * MIB)
    assert _refused(_plan(pki, disk), [disk], root) == "disk_too_small"


def test_mounted_and_boot_medium_and_read_only(pki: Pki, root: Root) -> None:
    for kw, reason in (
        ({"mounted": True}, "disk_mounted"),
        ({"boot_medium": True}, "boot_medium"),
        ({"read_only": True}, "disk_read_only"),
        ({"removable": True}, "disk_not_eligible"),
    ):
        disk = _disk(**kw)
        assert not disk.eligible
        assert _refused(_plan(pki, disk), [disk], root) == reason, kw


def test_loop_only_with_allow_loop() -> None:
    loop = Disk(
        "loop3",
        "/dev/loop3",
        GIB,
        512,
        512,
        "",
        "loop:t.img",
        "",
        "",
        False,
        False,
        False,
        False,
        False,
        False,
    )
    assert not judge(loop, None, allow_loop=False).eligible
    assert "loop" in loop.reasons
    loop.reasons = []
    assert judge(loop, None, allow_loop=True).eligible


def test_wipe_needs_confirmation_when_disk_has_signatures(pki: Pki, root: Root) -> None:
    disk = _disk(has_signatures=True)
    assert _refused(_plan(pki, disk), [disk], root) == "wipe_not_confirmed"
    wrong = _plan(pki, disk, confirm_wipe_serial="SOMEONE-ELSE")
    assert _refused(wrong, [disk], root) == "wipe_not_confirmed"
    resolved = validate_plan(_plan(pki, disk, confirm_wipe_serial=SERIAL), [disk], root)
    assert resolved.wipe_confirmed


@pytest.mark.parametrize(
    "files,links",
    [
        ([{"p": "../etc/passwd", "m": 0o644, "s": 1, "h": _hex("x")}], None),
        ([{"p": "/etc/passwd", "m": 0o644, "s": 1, "h": _hex("x")}], None),
        ([{"p": "bin/a\nb", "m": 0o644, "s": 1, "h": _hex("x")}], None),
        ([{"p": "a" * 300, "m": 0o644, "s": 1, "h": _hex("x")}], None),
        ([{"p": "bin/x", "m": 0o644, "s": 1, "h": _hex("x")}], [{"p": "lib", "t": "../../etc"}]),
    ],
)
def test_manifest_with_unsafe_names_is_refused(
    pki: Pki, root: Root, files: list[dict[str, Any]], links: list[dict[str, str]] | None
) -> None:
    disk = _disk()
    env = signed_manifest(_payload(files=files, links=links), pki.release)
    assert _refused(_plan(pki, disk, manifest=env.to_doc()), [disk], root) == "bad_manifest"


def test_bad_signature(pki: Pki, root: Root) -> None:
    disk = _disk()
    stranger = signed_manifest(_payload(), [keys.generate()])
    assert _refused(_plan(pki, disk, manifest=stranger.to_doc()), [disk], root) == "bad_signature"
    # A payload changed after signing: the signature no longer covers it.
    doc = signed_manifest(_payload(), pki.release).to_doc()
    other = signed_manifest(
        _payload(files=[{"p": "bin/evil", "m": 0o755, "s": 10, "h": _hex("e")}]), pki.release
    ).to_doc()
    doc["payload"] = other["payload"]
    assert _refused(_plan(pki, disk, manifest=doc), [disk], root) == "bad_signature"


def test_unknown_keys_and_bad_values(pki: Pki, root: Root) -> None:
    disk = _disk()
    assert _refused(_plan(pki, disk, extra=1), [disk], root) == "bad_plan"
    assert _refused(_plan(pki, disk, layout="simple"), [disk], root) == "unsupported_layout"
    assert _refused(_plan(pki, disk, hostname="bad host"), [disk], root) == "bad_hostname"
    plan = _plan(pki, disk)
    plan["disk"] = {"serial": SERIAL, "size": disk.size, "path": "/dev/sda"}
    assert _refused(plan, [disk], root) == "bad_plan"


def test_layout_sizes() -> None:
    small = plan_layout(2 * GIB, IMAGE_RAW, 1 * MIB)
    assert IMAGE_RAW // MIB <= small.slot_mib < 512
    assert small.fixed_mib + small.data_min_mib <= 2 * GIB // MIB
    big = plan_layout(1 << 40, IMAGE_RAW, MIB)
    assert big.slot_mib == 16 * 1024
    with pytest.raises(PlanRefused):
        plan_layout(800 * MIB, IMAGE_RAW, MIB)
    script = small.sfdisk_script(
        {n: f"uuid-{n}" for n in ("bios_grub", "esp", "root-a", "root-b", "data")}
    )
    lines = script.splitlines()
    assert lines[0] == "label: gpt"
    assert lines[1].startswith(f'size=1MiB, type={BIOS_BOOT_TYPE}, name="bios_grub"')
    assert lines[2].startswith('size=512MiB, type=U, name="esp"')
    assert 'type=L, name="data"' in lines[5] and "size=" not in lines[5]


def test_inventory_marks_boot_medium_mounted_and_signatures() -> None:
    dev = {
        "name": "sdb",
        "path": "/dev/sdb",
        "size": 16 * GIB,
        "serial": "USB1",
        "type": "disk",
        "rm": True,
        "children": [
            {
                "name": "sdb1",
                "type": "part",
                "fstype": "iso9660",
                "label": "SPK_SHIM",
                "mountpoints": ["/run/shim"],
            },
        ],
    }
    disk = judge(disk_from_lsblk(dev, signatures=False, boot_names=set()), dev, allow_loop=False)
    assert disk.boot_medium and disk.mounted and disk.has_signatures and disk.removable
    assert {"boot_medium", "mounted", "removable"} <= set(disk.reasons)
    lvm = {
        "name": "sdc",
        "size": GIB,
        "serial": "X",
        "type": "disk",
        "children": [{"name": "vg-lv", "type": "lvm"}],
    }
    judged = judge(disk_from_lsblk(lvm, signatures=False, boot_names=set()), lvm, allow_loop=False)
    assert "in_use_by_volume_manager" in judged.reasons


def test_grub_cfg_finds_slots_without_device_names() -> None:
    ids = bootloader.BootIds("1111-data", {"a": "aaaa-part", "b": "bbbb-part"})
    cfg = bootloader.grub_cfg(ids)
    assert "/dev/" not in cfg and "hd0" not in cfg
    assert cfg.count("search --no-floppy --fs-uuid --set=spk_data 1111-data") == 2
    assert "--id smechvisor-a" in cfg and "--id smechvisor-b" in cfg
    assert "set root=($spk_disk,gpt3)" in cfg and "set root=($spk_disk,gpt4)" in cfg
    line_b = next(x for x in cfg.splitlines() if "smechvisor.slot=b" in x)
    assert "root=PARTUUID=bbbb-part" in line_b
    assert "intel_iommu=on amd_iommu=on iommu=pt" in line_b


def test_image_sink_bounds_memory_and_stops_a_decompression_bomb(tmp_path: Path) -> None:
    """64 MiB of zeros compress to a few KiB; declared as 1 MiB, the sink refuses them
    without ever holding the decoded 64 MiB in memory."""
    raw = bytes(64 << 20)
    blob = zstandard.ZstdCompressor(level=3).compress(raw)
    slot = tmp_path / "slot"
    slot.write_bytes(b"")

    class Inst:
        def __init__(self) -> None:
            self.parts = {"root-a": str(slot)}
            self.durable_bytes = 0
            self.store = BlobStore(NodePaths(tmp_path / "data"))

        def emit_progress(self) -> None:
            pass

        def store_partial(self, blob_id: str) -> int:
            return install.Installer.store_partial(self, blob_id)  # type: ignore[arg-type]

    image = ImageComponent(
        "base", "1", "sha256:" + hashlib.sha256(blob).hexdigest(), "zstd", 1 << 20,
        hashlib.sha256(raw[: 1 << 20]).hexdigest(),
    )  # fmt: skip
    sink = install._ImageSink(Inst(), image, len(blob))  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        with pytest.raises(install.InstallError) as info:
            # Decoding runs on the sink's own thread: the refusal comes by finish().
            sink.write(blob)
            sink.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        sink.close()
    assert info.value.reason == "image_too_large"
    assert peak < 24 << 20, f"decoding held {peak >> 20} MiB at once"
    # The refused blob's store copy is gone too: only verified blobs stay on the node.
    store = BlobStore(NodePaths(tmp_path / "data"))
    assert list(store.partial_dir.iterdir()) == [] and list(store.blobs_dir.iterdir()) == []


def test_deploy_errors_join_the_error_tree() -> None:
    """Every deploy failure is a SpkVisorError: the CLI maps it to its exit code and shows
    its message, instead of reporting an internal error (exit 1)."""
    cases = [
        (install.PlanRefused("disk_too_small", "needs more"), ExitCode.REFUSED),
        (install.InstallError("io_error", "slot A"), ExitCode.OPERATOR_NEEDED),
        (bootloader.BootloaderError("efi", "mcopy failed"), ExitCode.OPERATOR_NEEDED),
        (receiver.SessionFailed("the donor went away"), ExitCode.TRANSIENT),
        (donor.DeployFailed(ExitCode.REFUSED, "plan", "refused"), ExitCode.REFUSED),
    ]
    for error, code in cases:
        assert isinstance(error, SpkVisorError), type(error)
        assert error.exit_code == code, type(error)
        assert error.message == str(error)
    assert install.PlanRefused("disk_too_small", "needs more").reason == "disk_too_small"
    assert str(install.InstallError("io_error", "slot A")) == "io_error: slot A"


def test_the_manifest_signature_is_checked_once_per_plan(
    pki: Pki, root: Root, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = dsse.verify

    def counting(env: Any, role: Any, what: str) -> set[str]:
        calls.append(what)
        return real(env, role, what)

    ed25519: list[bytes] = []
    real_key_verify = keys.PublicKey.verify

    def counting_key(key: keys.PublicKey, signature: bytes, message: bytes) -> bool:
        ed25519.append(signature)
        return real_key_verify(key, signature, message)

    monkeypatch.setattr(dsse, "verify", counting)
    monkeypatch.setattr(keys.PublicKey, "verify", counting_key)
    disk = _disk()
    validate_plan(_plan(pki, disk), [disk], root)
    assert calls == ["manifest"]
    # And underneath: one ed25519 verification per release signature, nothing repeated.
    assert len(ed25519) == len(pki.release) == len(set(ed25519))
