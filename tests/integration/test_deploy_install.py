"""The install to disk, for real: a sparse file on a loop device, sfdisk, mkfs, GRUB, QEMU.

One full install (module fixture) is checked piece by piece, then the disk image is booted
under QEMU (TCG) with SeaBIOS and with OVMF: the test initramfs in slot A prints a marker
with the slot and its kernel command line, which proves the whole boot path. A second
disk has its loop device pulled mid-write: the install fails and no boot code is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spk_visor.deploy import bootloader
from spk_visor.deploy.install import Installer, InstallError, validate_plan
from spk_visor.deploy.inventory import Disk, inventory
from spk_visor.install.layout import BIOS_BOOT_TYPE, PART_NAMES
from spk_visor.ota import bundle as bundle_mod
from spk_visor.ota import nodeconf
from spk_visor.ota.store import sha256_file
from spk_visor.trust import roots
from tests.support import deploy_images
from tests.support.prereq import DISK_TOOLS, need_command, need_commands, need_root
from tests.support.sshkeys import public_line

DISK_BYTES = 2 << 30
BOOT_TIMEOUT_S = 150
EFI_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
ADMIN_KEYS = f"{public_line('ed25519', 'admin@desk')}\n{public_line('ecdsa')}\n"


def _prereqs() -> None:
    need_root()
    need_commands(DISK_TOOLS)
    for cmd, pkg in (
        ("mcopy", "mtools"),
        ("grub-install", "grub2-common"),
        ("grub-mkimage", "grub-common"),
        ("udevadm", "udev"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("apt-get", "apt"),
    ):
        need_command(cmd, pkg)
    if not Path("/usr/lib/grub/i386-pc").is_dir():
        pytest.skip("GRUB i386-pc modules missing: install grub-pc-bin")
    if not Path("/usr/lib/grub/x86_64-efi").is_dir():
        pytest.skip("GRUB x86_64-efi modules missing: install grub-efi-amd64-bin")


def _run(argv: list[str], **kw: Any) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kw)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return str(done.stdout)


@dataclass
class LoopDisk:
    image: Path
    loop: str
    disk: Disk


@contextlib.contextmanager
def loop_disk(directory: Path, size: int = DISK_BYTES) -> Iterator[LoopDisk]:
    image = directory / f"spk-target-{uuid.uuid4().hex[:8]}.img"
    with image.open("wb") as f:
        f.truncate(size)
    loop = _run(["losetup", "--find", "--show", "--partscan", str(image)]).strip()
    try:
        serial = f"loop:{image.name}"
        disks = [d for d in inventory(allow_loop=True) if d.serial == serial]
        assert len(disks) == 1, f"inventory does not show {serial}"
        yield LoopDisk(image, loop, disks[0])
    finally:
        subprocess.run(
            ["umount", "--lazy", str(directory / "mnt")], capture_output=True, check=False
        )
        subprocess.run(["partx", "--delete", loop], capture_output=True, timeout=30, check=False)
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30, check=False)


def _plan(release: deploy_images.TestRelease, disk: Disk) -> dict[str, Any]:
    return {
        "manifest": json.loads(release.result.manifest_path.read_bytes()),
        "disk": {"serial": disk.serial, "size": disk.size},
        "layout": "ab",
        "hostname": "node-1",
        "confirm_wipe_serial": disk.serial if disk.has_signatures else None,
        "authorized_keys": ADMIN_KEYS,
    }


def _stream(installer: Installer, bundle: Path, blob_order: list[tuple[str, int]]) -> None:
    """What the receiver does with the FILE records: blob by blob, 64 KiB at a time."""
    with bundle.open("rb") as f:
        bundle_mod.read_header(f)
        for blob_id, size in blob_order:
            sink = installer.receive(blob_id, size)
            left = size
            while left:
                chunk = f.read(min(64 << 10, left))
                sink.write(chunk)
                left -= len(chunk)
            sink.finish()


@dataclass
class Installed:
    release: deploy_images.TestRelease
    image: Path
    loop: str
    report: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    sfdisk: dict[str, Any]
    mbr: bytes
    bios_part: bytes
    efi_listing: str
    efi_bytes: bytes
    data_files: dict[str, bytes]
    current_link: str
    slot_a_sha256: str
    seconds: float
    # What the data partition holds (mounted read-only after the install): for each path,
    # (mode, uid, gid, sha256 or None for a directory), and a few files' bytes.
    data_tree: dict[str, tuple[int, int, int, str | None]]
    data_bytes: dict[str, bytes]


def _data_tree(
    device: str, where: Path
) -> tuple[dict[str, tuple[int, int, int, str | None]], dict[str, bytes]]:
    where.mkdir(exist_ok=True)
    _run(["mount", "-o", "ro", "-t", "ext4", device, str(where)])
    try:
        tree: dict[str, tuple[int, int, int, str | None]] = {}
        for sub in ("etc/ssh", "var/lib/spk-visor"):
            for dirpath, _dirs, names in os.walk(where / sub):
                for p in [Path(dirpath), *(Path(dirpath, n) for n in names)]:
                    st = p.lstat()
                    digest = None if p.is_dir() else sha256_file(p)
                    tree[str(p.relative_to(where))] = (st.st_mode, st.st_uid, st.st_gid, digest)
        wanted = ("etc/ssh/authorized_keys/root", "var/lib/spk-visor/ota/installed.json")
        data = {n: (where / n).read_bytes() for n in wanted if (where / n).is_file()}
        for p in (where / "var/lib/spk-visor/ota/store/manifests").glob("*.json"):
            data[str(p.relative_to(where))] = p.read_bytes()
        return tree, data
    finally:
        _run(["umount", str(where)])


def _debugfs_cat(device: str, path: str) -> bytes:
    done = subprocess.run(
        ["debugfs", "-R", f"cat {path}", device], capture_output=True, timeout=60, check=False
    )
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    _prereqs()
    tmp = tmp_path_factory.mktemp("deploy")
    release = deploy_images.release(tmp)
    root = roots.load_anchor(release.pki.root_env().to_bytes(), "test root")
    with loop_disk(tmp) as ld:
        resolved = validate_plan(_plan(release, ld.disk), [ld.disk], root)
        events: list[tuple[str, dict[str, Any]]] = []
        inst = Installer(resolved, tmp / "mnt", lambda kind, doc: events.append((kind, doc)))
        start = time.monotonic()
        try:
            inst.prepare()
            _stream(inst, release.result.bundle, list(resolved.manifest.blobs.items()))
            report = inst.finalize()
        except BaseException:
            inst.abort("test failure")
            raise
        seconds = time.monotonic() - start
        sfdisk = json.loads(_run(["sfdisk", "--json", ld.loop]))
        with open(ld.loop, "rb") as f:
            mbr = f.read(512)
        bios_part = Path(inst.parts["bios_grub"]).read_bytes()
        efi_listing = _run(["mdir", "-b", "-i", inst.parts["esp"], "::/EFI/BOOT"], env=MTOOLS_ENV)
        efi_bytes = subprocess.run(
            ["mcopy", "-n", "-i", inst.parts["esp"], bootloader.EFI_PATH, "-"],
            capture_output=True,
            env=MTOOLS_ENV,
            timeout=60,
            check=True,
        ).stdout
        data = inst.parts["data"]
        files = {
            p: _debugfs_cat(data, p)
            for p in (
                "/etc/fstab",
                "/boot/grub/grub.cfg",
                "/etc/hostname",
                "/etc/spk-deploy.json",
                "/etc/spk-visor/ota.conf",
            )
        }
        files["grubenv"] = _debugfs_cat(data, "/boot/grub/grubenv")
        link = subprocess.run(
            ["debugfs", "-R", "stat /opt/smechvisord/current", data],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
        rid = report["daemon_release"]
        for entry in ("bin/smechvisord", "lib/VERSION"):
            files[entry] = _debugfs_cat(data, f"/opt/smechvisord/releases/{rid}/{entry}")
        digest = hashlib.sha256()
        raw_size = resolved.manifest.image.raw_size  # type: ignore[union-attr]
        with open(inst.parts["root-a"], "rb") as f:
            digest.update(f.read(raw_size))
        data_tree, data_bytes = _data_tree(data, tmp / "data-ro")
        yield Installed(
            release,
            ld.image,
            ld.loop,
            report,
            events,
            sfdisk,
            mbr,
            bios_part,
            efi_listing,
            efi_bytes,
            files,
            link,
            digest.hexdigest(),
            seconds,
            data_tree,
            data_bytes,
        )


def test_partition_table_matches_layout(installed: Installed) -> None:
    table = installed.sfdisk["partitiontable"]
    assert table["label"] == "gpt"
    parts = table["partitions"]
    assert [p["name"] for p in parts] == list(PART_NAMES)
    sector = table.get("sectorsize", 512)
    mib = (1 << 20) // sector
    sizes = [p["size"] for p in parts]
    assert sizes[0] == 1 * mib and sizes[1] == 512 * mib
    assert sizes[2] == sizes[3] and sizes[2] >= installed.release.image.stat().st_size // sector
    assert [p["type"] for p in parts] == [BIOS_BOOT_TYPE, EFI_TYPE] + [LINUX_TYPE] * 3
    assert all(p["start"] % mib == 0 for p in parts), "partitions must be MiB-aligned"
    # data takes the rest, up to the backup GPT
    end = parts[4]["start"] + parts[4]["size"]
    assert table["lastlba"] - end < mib
    uuids = {p["name"]: p["uuid"].lower() for p in parts}
    assert uuids["root-a"] == installed.report["partuuids"]["root-a"]


def test_slot_a_holds_the_signed_image(installed: Installed) -> None:
    expected = hashlib.sha256(installed.release.image.read_bytes()).hexdigest()
    assert installed.slot_a_sha256 == expected == installed.report["slot_a_sha256"]


def test_daemon_tree_and_current_link(installed: Installed) -> None:
    rid = installed.report["daemon_release"]
    assert rid and rid.startswith("1.0.0-")
    tree = installed.release.tree
    assert installed.data_files["bin/smechvisord"] == (tree / "bin/smechvisord").read_bytes()
    assert installed.data_files["lib/VERSION"] == b"1.0.0\n"
    assert f'Fast link dest: "releases/{rid}"' in installed.current_link


def test_config_files(installed: Installed) -> None:
    report = installed.report
    fstab = installed.data_files["/etc/fstab"].decode()
    assert f"UUID={report['data_uuid']} /data ext4" in fstab
    assert f"UUID={report['esp_uuid']} /boot/efi vfat" in fstab
    assert "/dev/" not in fstab
    cfg = installed.data_files["/boot/grub/grub.cfg"].decode()
    assert cfg.count(f"search --no-floppy --fs-uuid --set=spk_data {report['data_uuid']}") == 2
    for slot in ("a", "b"):
        line = next(x for x in cfg.splitlines() if f"smechvisor.slot={slot}" in x)
        assert f"root=PARTUUID={report['partuuids'][f'root-{slot}']}" in line
        for flag in ("intel_iommu=on", "amd_iommu=on", "iommu=pt", "console=ttyS0,115200"):
            assert flag in line.split()
    assert "/dev/" not in cfg and "loop" not in cfg
    assert b"saved_entry=smechvisor-a" in installed.data_files["grubenv"]
    assert installed.data_files["/etc/hostname"] == b"node-1\n"
    record = json.loads(installed.data_files["/etc/spk-deploy.json"])
    assert record["manifest_sha256"] == installed.release.result.manifest_sha256


def test_ota_conf_names_this_disks_slots_by_partuuid(installed: Installed, tmp_path: Path) -> None:
    """OTA writes the slot the node did not boot: that must be a partition of THIS disk.
    Partition labels (root-a, root-b) repeat on every SmechVisor disk, so with a second one
    attached /dev/disk/by-partlabel/root-b could name the other disk's slot. The install
    names the slots by their GPT partition GUIDs, unique to this install."""
    text = installed.data_files["/etc/spk-visor/ota.conf"].decode()
    conf = tmp_path / "ota.conf"
    conf.write_text(text)
    os.environ[nodeconf.CONF_ENV] = str(conf)
    try:
        config = nodeconf.load_config(nodeconf.NodePaths(Path("/nonexistent")))
    finally:
        del os.environ[nodeconf.CONF_ENV]
    uuids = installed.report["partuuids"]
    assert config.slots.a == f"/dev/disk/by-partuuid/{uuids['root-a']}"
    assert config.slots.b == f"/dev/disk/by-partuuid/{uuids['root-b']}"
    assert config.slots.grubenv == "/boot/grub/grubenv"
    assert "by-partlabel" not in text


def test_admin_keys_on_the_data_partition(installed: Installed) -> None:
    """sshd_config's AuthorizedKeysFile /data/etc/ssh/authorized_keys/%u, as StrictModes
    wants it: root's file 0600, every directory on the way root-owned 0755."""
    key = "etc/ssh/authorized_keys/root"
    assert installed.data_bytes[key].decode() == ADMIN_KEYS
    mode, uid, gid, _ = installed.data_tree[key]
    assert (oct(mode & 0o7777), uid, gid) == (oct(0o600), 0, 0)
    assert mode & 0o170000 == 0o100000  # a regular file, not a link
    for d in ("etc/ssh", "etc/ssh/authorized_keys"):
        mode, uid, gid, _ = installed.data_tree[d]
        assert (oct(mode & 0o7777), uid, gid) == (oct(0o755), 0, 0), d
    # Written atomically: no temporary file left beside it.
    assert [p for p in installed.data_tree if p.startswith("etc/ssh/")] == [
        "etc/ssh/authorized_keys",
        key,
    ]


def test_ota_store_holds_the_signed_release(installed: Installed) -> None:
    """The new node keeps what it was installed from (so it can deploy its peer, and OTA
    knows what is installed): the signed manifest byte for byte, every blob under its
    hash, and installed.json naming slot A and the daemon release."""
    result = installed.release.result
    sha = result.manifest_sha256
    ota = "var/lib/spk-visor/ota"
    assert installed.data_bytes[f"{ota}/store/manifests/{sha}.json"] == (
        result.manifest_path.read_bytes()
    )
    blob_ids = [b["id"] for b in result.payload["blobs"]]
    for blob_id in blob_ids:
        hexd = blob_id.removeprefix("sha256:")
        assert installed.data_tree[f"{ota}/store/blobs/sha256/{hexd}"][3] == hexd
    assert not [p for p in installed.data_tree if p.startswith(f"{ota}/store/partial/")]
    doc = json.loads(installed.data_bytes[f"{ota}/installed.json"])
    assert doc["manifest"] == sha and doc["version"] == "1.0.0"
    assert doc["base"]["slot"] == "a" and doc["base"]["manifest"] == sha
    assert doc["base"]["raw_sha256"] == installed.slot_a_sha256
    assert doc["daemon"]["release"] == installed.report["daemon_release"]
    assert doc["daemon"]["pack"] in blob_ids


def test_bios_and_efi_boot_code_present(installed: Installed) -> None:
    assert installed.report["ok"] is True, installed.report["boot"]
    assert installed.report["boot"]["bios"] == "ok"
    # GRUB's boot.img in the MBR carries the string "GRUB "; the partition table entry
    # at 0x1BE is the protective MBR (type 0xEE) and the signature 55AA stays.
    assert b"GRUB" in installed.mbr[:440]
    assert installed.mbr[0x1BE + 4] == 0xEE and installed.mbr[510:] == b"\x55\xaa"
    # core.img in the BIOS-boot partition (not zero any more).
    assert installed.bios_part.strip(b"\0")
    assert installed.efi_listing.split() == ["::/EFI/BOOT/BOOTX64.EFI"]
    assert installed.efi_bytes[:2] == b"MZ", "BOOTX64.EFI must be a PE image"
    phases = [doc["phase"] for kind, doc in installed.events if kind == "phase"]
    assert phases.index("bootloader") > phases.index("config") > phases.index("image")
    assert phases[-1] == "done"


def _boot(installed: Installed, tmp: Path, firmware: str) -> str:
    need_command("qemu-system-x86_64", "qemu-system-x86")
    log = tmp / f"serial-{firmware}.log"
    disk = tmp / f"disk-{firmware}.img"
    # A copy, so the two boots do not share state (GRUB writes nothing, but be sure).
    subprocess.run(["cp", "--sparse=always", str(installed.image), str(disk)], check=True)
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
        "-serial",
        f"file:{log}",
        "-drive",
        f"file={disk},format=raw,if=virtio",
    ]
    if firmware == "ovmf":
        if not OVMF_CODE.exists():
            pytest.skip("OVMF missing: install ovmf")
        vars_copy = tmp / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        argv += [
            "-drive",
            f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,file={vars_copy}",
        ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and deploy_images.MARKER.encode() in log.read_bytes():
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.mark.parametrize("firmware", ["seabios", "ovmf"])
def test_disk_boots(installed: Installed, tmp_path: Path, firmware: str) -> None:
    # The loop device stays attached for the module; sync so the file holds everything.
    os.sync()
    log = _boot(installed, tmp_path, firmware)
    assert f"{deploy_images.MARKER} slot=a" in log, log[-3000:]
    cmdline = next(x for x in log.splitlines() if x.startswith("SPK-TEST-CMDLINE"))
    assert f"root=PARTUUID={installed.report['partuuids']['root-a']}" in cmdline
    assert "intel_iommu=on amd_iommu=on iommu=pt" in cmdline


def test_disk_pulled_mid_write_fails_without_boot_code(tmp_path: Path) -> None:
    """The backing store dies under the image write: failure, and no boot code anywhere."""
    _prereqs()
    release = deploy_images.release(tmp_path)
    root = roots.load_anchor(release.pki.root_env().to_bytes(), "test root")
    # Back the disk by a small tmpfs: once prepared, it is shrunk to what is used, so the
    # image write hits ENOSPC in the backing file and the loop device returns I/O errors,
    # the way a pulled disk does (losetup -d alone only defers while partitions are open).
    store = tmp_path / "store"
    store.mkdir()
    _run(["mount", "-t", "tmpfs", "-o", "size=2200m", "spk-deploy-fault", str(store)])
    try:
        with loop_disk(store) as ld:
            resolved = validate_plan(_plan(release, ld.disk), [ld.disk], root)
            inst = Installer(resolved, tmp_path / "mnt", lambda kind, doc: None)
            inst.prepare()
            os.sync()
            used = shutil.disk_usage(store).used
            _run(["mount", "-o", f"remount,size={used + (2 << 20)}", str(store)])
            with pytest.raises(InstallError) as caught:
                _stream(inst, release.result.bundle, list(resolved.manifest.blobs.items()))
                inst.finalize()
            assert caught.value.reason == "io_error", caught.value
            assert not inst.state.boot_started
            inst.abort(str(caught.value))
            _run(["mount", "-o", "remount,size=2200m", str(store)])
            with open(ld.loop, "rb") as f:
                mbr = f.read(512)
            assert not mbr[:440].strip(b"\0"), "no boot code may be left in the MBR"
            assert not Path(inst.parts["bios_grub"]).read_bytes().strip(b"\0")
            with open(inst.parts["root-a"], "rb") as f:
                assert not f.read(1 << 20).strip(b"\0"), "slot A must hold no filesystem"
    finally:
        subprocess.run(
            ["umount", "--lazy", str(store)], capture_output=True, timeout=30, check=False
        )


def test_boot_prep_runs_during_the_stream_and_leaves_no_boot_path(tmp_path: Path) -> None:
    """GRUB's modules, core.img, grub.cfg and BOOTX64.EFI are made while the image streams,
    but until finalize nothing is on a boot path: MBR boot code, BIOS-boot partition and
    the ESP's fallback file are all still empty."""
    _prereqs()
    release = deploy_images.release(tmp_path)
    root = roots.load_anchor(release.pki.root_env().to_bytes(), "test root")
    with loop_disk(tmp_path) as ld:
        resolved = validate_plan(_plan(release, ld.disk), [ld.disk], root)
        inst = Installer(resolved, tmp_path / "mnt", lambda kind, doc: None)
        try:
            inst.prepare()
            image = resolved.manifest.image
            assert image is not None
            with release.result.bundle.open("rb") as f:
                bundle_mod.read_header(f)
                for blob_id, size in resolved.manifest.blobs.items():
                    if blob_id != image.blob:
                        f.seek(size, os.SEEK_CUR)
                        continue
                    sink = inst.receive(blob_id, size)
                    sink.write(f.read(size // 2))
                    break
            prep = inst._join_boot_prep()  # the prep thread started with the image sink
            assert prep.config is None and prep.bios is True, prep
            boot = tmp_path / "mnt" / "boot" / "grub"
            assert (boot / "i386-pc" / "core.img").is_file()
            assert (boot / "grub.cfg").is_file() and isinstance(prep.efi, Path)
            with open(ld.loop, "rb") as disk:
                assert not disk.read(440).strip(b"\0"), "boot code in the MBR mid-stream"
            assert not Path(inst.parts["bios_grub"]).read_bytes().strip(b"\0")
            listing = subprocess.run(
                ["mdir", "-b", "-i", inst.parts["esp"], "::/EFI/BOOT/BOOTX64.EFI"],
                capture_output=True,
                timeout=60,
                check=False,
                env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
            )
            assert listing.returncode != 0, "BOOTX64.EFI on the ESP mid-stream"
            assert not inst.state.boot_started
        finally:
            assert inst.abort("test end") == []
