"""The end-to-end chain's machine: from a blank QEMU disk to a serving SmechVisor node.

The module fixture `chain` runs steps 1 to 4 of issue 13's test, each timed:

1. the base image (`image build`, cached), v2's and v3's bases (the image with an
   overlay: a marker; for v3 also a required health check that fails), releases v1, v2
   and v3 signed by the CLI (`ota keygen`, `ota root init/sign`, `ota build`), and the
   Deploy Shim ISO;
2. a blank machine boots the shim ISO (QEMU TCG, a sparse virtio disk, the receiver port
   forwarded to the host);
3. `deploy send CODE --target 127.0.0.1:PORT --bundle v1 --authorized-key ...`, with the
   code read from the serial console;
4. the machine reboots (the shim's QEMU ends: -no-reboot) and boots its disk with SeaBIOS;
   OpenRC starts smechvisord, which answers /api/health on the forwarded port. The node's
   QEMU has no -no-reboot: its later reboots (a clean `reboot`, a failed trial boot) stay
   in the same process and console log.

Later steps (tests/e2e/test_chain.py) use `chain.node`: ports, disk, serial log, `boot()`,
`reboot()`, `power_cycle()`. The tests of one chain share one machine, so they must run in
their file's order: pytest-randomly's shuffle is undone for tests/e2e (see the hook below);
every other test keeps its random order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import e2e_lan, e2e_machine, e2e_release
from tests.support.e2e_machine import Chain
from tests.support.prereq import need_command, need_root

E2E_DIR = Path(__file__).resolve().parent

# Host tools, with the Debian package that has each: the image build, the shim ISO, QEMU.
TOOLS = (
    ("mmdebstrap", "mmdebstrap"), ("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs"),
    ("strip", "binutils"), ("zstd", "zstd"), ("grub-mkrescue", "grub-common"),
    ("grub-install", "grub2-common"), ("xorriso", "xorriso"), ("mformat", "mtools"),
    ("mkfs.vfat", "dosfstools"), ("busybox", "busybox-static"), ("cpio", "cpio"),
    ("depmod", "kmod"), ("udevadm", "udev"), ("python3.11", "python3.11-minimal"),
    ("qemu-system-x86_64", "qemu-system-x86"),
)  # fmt: skip
PATHS = (
    (Path("/usr/lib/grub/i386-pc"), "grub-pc-bin"),
    (Path("/usr/lib/grub/x86_64-efi"), "grub-efi-amd64-bin"),
    (e2e_machine.OVMF_CODE, "ovmf"),
    (e2e_machine.OVMF_VARS, "ovmf"),
)


def prereqs() -> None:
    need_root()
    for tool, package in TOOLS:
        need_command(tool, package)
    for path, package in PATHS:
        if not path.exists():
            pytest.skip(f"{path} missing: install the Debian package {package} (make sysdeps)")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    prereqs()
    work = tmp_path_factory.mktemp("e2e")
    timings = e2e_release.Timings(work / "timings.json")
    print(f"\n[e2e] work directory: {work}", flush=True)

    # 1. Build and sign, with the CLI.
    keys = e2e_release.pki()
    image = e2e_release.base_image(keys.root_json)
    timings.done("1a_image_build" + ("_cached" if image.get("cached") else ""))
    # v2's and v3's bases: the image with an overlay (a marker; v3's also a required
    # health check that fails), each built (and cached) by `image build --overlay`.
    bases = {
        version: e2e_release.base_image(
            keys.root_json,
            e2e_release.overlay(work / f"overlay-{version}", version, failing=failing),
        )
        for version, failing in (("2.0.0", False), ("3.0.0", True))
    }
    cached_bases = all(b.get("cached") for b in bases.values())
    timings.done("1b_overlay_images" + ("_cached" if cached_bases else ""))
    releases_dir = work / "releases"
    release = e2e_release.release
    releases = {
        "v1": release(releases_dir, keys, "1.0.0", 1_000_000, Path(image["path"])),
        "v2": release(releases_dir, keys, "2.0.0", 2_000_000, Path(bases["2.0.0"]["path"])),
        # No daemon: the node keeps v2's, and only the base is on trial.
        "v3": release(
            releases_dir, keys, "3.0.0", 3_000_000, Path(bases["3.0.0"]["path"]), daemon=False
        ),
    }
    timings.done("1c_sign_releases")
    iso, cached = e2e_release.shim_iso(keys.root_json)
    timings.done("1d_shim_iso" + ("_cached" if cached else ""))

    home = work / "home"
    admin_pub = e2e_machine.admin_key(home)
    disk = e2e_machine.blank_disk(work / "disk.raw")
    # The rack's LAN (a hub with DHCP, on loopback): the node is on it from its first boot,
    # for the peer it deploys in the last step.
    lan = e2e_lan.Lan()
    lan.start()
    node = e2e_machine.Node(work / "node", disk, home, releases_dir, lan=lan)
    node.workdir.mkdir()
    shim_dir = work / "shim"
    shim_dir.mkdir()
    shim: e2e_machine.Qemu | None = None
    try:
        # 2. The blank machine boots the shim; the operator reads the code.
        receiver_port = e2e_machine.free_port()
        shim = e2e_machine.boot_shim(iso, disk, shim_dir, receiver_port=receiver_port)
        code = e2e_machine.read_code(shim)
        timings.done("2_shim_boot")

        # 3. deploy send installs v1 and gives the admin's key.
        send = e2e_release.cli(
            "deploy", "send", code, "--target", f"127.0.0.1:{receiver_port}",
            "--bundle", str(releases["v1"].bundle), "--authorized-key", str(admin_pub),
            "--hostname", "e2e-node-1", "--json",
            timeout=e2e_machine.INSTALL_TIMEOUT_S, check=False,
        )  # fmt: skip
        assert send.returncode == 0, (
            f"deploy send exited {send.returncode}:\n{send.stdout[-3000:]}\n"
            f"{send.stderr[-3000:]}\nshim console:\n{shim.text()[-4000:]}"
        )
        deploy = json.loads(send.stdout)
        timings.done("3_install")

        # 4. The target reboots by itself: QEMU (-no-reboot) ends; the disk boots.
        rc = shim.wait_exit(120)
        assert rc is not None, f"the target did not reboot:\n{shim.text()[-3000:]}"
        shim.stop()
        node.boot("seabios")
        node.wait_healthy(e2e_machine.FIRST_BOOT_TIMEOUT_S)
        timings.done("4_first_boot_seabios")
        yield Chain(work, keys, image, iso, releases, admin_pub, node, timings, lan, deploy)
    finally:
        if shim is not None:
            shim.stop()
        node.stop()
        lan.stop()
        _keep_logs(work)


def _keep_logs(work: Path) -> None:
    """Copy the consoles where CI can collect them (SPK_E2E_LOGS=DIR), else leave them in
    the test's tmp directory."""
    dest = os.environ.get("SPK_E2E_LOGS")
    if not dest:
        return
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for log in [*work.rglob("*.log"), work / "timings.json"]:
        if log.is_file():  # named by machine: node/, shim/ and peer/ share file names
            name = "-".join(log.relative_to(work).parts)
            (out / name).write_bytes(log.read_bytes())


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put this directory's tests back in file order (pytest-randomly shuffled them): they
    are the steps of one chain on one machine. Their places in the run stay where the
    shuffle put them, so the rest of the suite keeps its random order."""
    ours = [i for i, item in enumerate(items) if Path(str(item.path)).parent == E2E_DIR]
    ordered = sorted((items[i] for i in ours), key=_definition_order)
    for slot, item in zip(ours, ordered, strict=True):
        items[slot] = item


def _definition_order(item: pytest.Item) -> tuple[str, int]:
    function = getattr(item, "function", None)
    line = function.__code__.co_firstlineno if function is not None else 0
    return str(item.path), line
