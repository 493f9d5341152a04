"""The OTA lifecycle on a real installed SmechVisor node under QEMU (TCG): issue 13, steps 6, 7.

The node is the real base image (`spk-visor image build`), installed by the install path
deploy's receiver runs onto a disk file with the admin's SSH key, and booted by QEMU
through SeaBIOS and GRUB from that disk. The releases are made with the CLI
(tests/support/e2e_releases.py). Then, from the host, as an admin:

  6. `spk-visor --ssh root@127.0.0.1:PORT --accept-new ota push v2.spkb` swaps the daemon
     live (/api/health says 2.0.0) and stages the v2 base in slot B (exit 4). The guest
     reboots; GRUB's one-shot boots slot B; the boot service's `ota boot-check` commits
     it; `ota status` says so.
  7. v3's base carries a required health check that fails. Its trial boot (slot A) fails,
     the node reboots by itself, GRUB's default brings slot B back, and `ota status` says
     why.

The steps are functions of a booted node (tests/support/e2e_machine.Machine) and the
admin (tests/support/e2e_admin.Admin), so the whole chain (shim, deploy, first boot, ...)
can run them on the node it deployed. Each step prints its wall time.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import e2e_install, e2e_releases
from tests.support.e2e_admin import Admin
from tests.support.e2e_vm import Machine, https_get_json
from tests.support.prereq import need_command, need_root


def _prereqs() -> None:
    need_root()
    for tool, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("sfdisk", "fdisk"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("grub-install", "grub2-common"),
        ("grub-editenv", "grub-common"),
        ("udevadm", "udev"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("zstd", "zstd"),
        ("strip", "binutils"),
    ):
        need_command(tool, package)
    if not Path("/usr/lib/grub/i386-pc").is_dir():
        pytest.skip("GRUB i386-pc modules missing: install grub-pc-bin")
    if not Path("/usr/lib/grub/x86_64-efi").is_dir():
        pytest.skip("GRUB x86_64-efi modules missing: install grub-efi-amd64-bin")


class Clock:
    """Wall time of each step, printed as it ends and kept for the summary."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    def step(self, name: str, started: float) -> None:
        self.steps[name] = time.monotonic() - started
        print(f"[e2e] {name}: {self.steps[name]:.0f} s", flush=True)


# ---- what an admin looks at ---------------------------------------------------------------


def ssh_ok(admin: Admin, node: Machine, command: str) -> str:
    run = admin.ssh(node.ssh_port, command)
    assert run.returncode == 0, f"ssh {command!r}: exit {run.returncode}\n{run.stderr}"
    return run.stdout


def booted_slot(admin: Admin, node: Machine) -> str:
    words = ssh_ok(admin, node, "cat /proc/cmdline").split()
    slots = [w.split("=", 1)[1] for w in words if w.startswith("smechvisor.slot=")]
    assert len(slots) == 1, words
    return slots[0]


def base_marker(admin: Admin, node: Machine) -> str:
    """What the running slot's marker file says ('' for the v1 image, which has none)."""
    run = admin.ssh(node.ssh_port, f"cat /{e2e_releases.MARKER}")
    return run.stdout.strip() if run.returncode == 0 else ""


def ota_status(admin: Admin, node: Machine) -> tuple[dict[str, Any], str]:
    """`spk-visor ota status` on the node (over SSH, as an operator runs it there), as JSON
    and as the text an operator reads."""
    as_json = ssh_ok(admin, node, "spk-visor ota status --json")
    text = ssh_ok(admin, node, "COLUMNS=200 spk-visor ota status")
    doc: dict[str, Any] = json.loads(as_json)
    return doc, " ".join(text.split())


def reboot(admin: Admin, node: Machine) -> None:
    """`reboot` on the node; QEMU exits (-no-reboot) and the same disk boots again."""
    run = admin.ssh(node.ssh_port, "reboot")
    assert run.returncode in (0, 255), run.stderr  # 255: the connection closed under us
    node.restart()


# ---- step 6 --------------------------------------------------------------------------------


def step6_update_commits(node: Machine, admin: Admin, v2: e2e_releases.Release,
                         clock: Clock) -> None:  # fmt: skip
    """Push v2: live daemon swap, base staged (exit 4); reboot into slot B; committed."""
    started = time.monotonic()
    push = admin.cli(
        *("--ssh", f"root@127.0.0.1:{node.ssh_port}", "--accept-new"),
        *("ota", "push", str(v2.bundle)),
    )
    assert push.returncode == 4, f"exit {push.returncode}\n{push.stdout}\n{push.stderr}"
    health = https_get_json(node.https_port, "/api/health")
    assert health is not None and health["version"] == v2.version, health
    assert booted_slot(admin, node) == "a"
    status, text = ota_status(admin, node)
    assert status["base"]["phase"] == "staged" and status["base"]["slot"] == "b", status
    clock.step("6 push v2 (daemon swapped, base staged)", started)

    started = time.monotonic()
    reboot(admin, node)
    node.wait_for(r"Checking a trial boot of the base system")
    health = node.wait_healthy()
    clock.step("6 reboot into slot B", started)
    assert health["version"] == v2.version, health
    assert booted_slot(admin, node) == "b"
    assert base_marker(admin, node) == f"base {v2.version}"
    status, text = ota_status(admin, node)
    base = status["base"]
    assert base["phase"] == "committed" and base["slot"] == "b", status
    assert "committed" in text and "slot b" in text.lower(), text
    # The slot written was this disk's slot B, named by its partition GUID.
    conf = ssh_ok(admin, node, "cat /etc/spk-visor/ota.conf")
    slot_b = re.search(r'^b = "(/dev/disk/by-partuuid/[0-9a-f-]+)"$', conf, re.M)
    assert slot_b, conf
    assert ssh_ok(admin, node, f"readlink -f {slot_b.group(1)}").strip() == "/dev/vda4"
    # Committed means the default moved: a plain reboot would come back to slot B.
    env = ssh_ok(admin, node, "grub-editenv /boot/grub/grubenv list")
    assert "saved_entry=smechvisor-b" in env and "next_entry=smechvisor" not in env, env


# ---- step 7 --------------------------------------------------------------------------------


def step7_bad_base_rolls_back(node: Machine, admin: Admin, v3: e2e_releases.Release,
                              clock: Clock) -> None:  # fmt: skip
    """Push v3 (its base fails a required check): the trial boot of slot A fails, the node
    reboots by itself into slot B, and `ota status` says why."""
    started = time.monotonic()
    push = admin.cli(
        *("--ssh", f"root@127.0.0.1:{node.ssh_port}"), *("ota", "push", str(v3.bundle))
    )
    assert push.returncode == 4, f"exit {push.returncode}\n{push.stdout}\n{push.stderr}"
    status, _text = ota_status(admin, node)
    assert status["base"]["phase"] == "staged" and status["base"]["slot"] == "a", status
    clock.step("7 push v3 (base staged)", started)

    started = time.monotonic()
    reboot(admin, node)
    # The trial boot: slot A, the failing check, and the node reboots by itself.
    node.wait_for(re.escape(e2e_releases.FAILING_REASON))
    trial = node.console()
    assert "smechvisor.slot=a" in trial or "slot A" in trial, trial[-3000:]
    node.restart()  # QEMU exited on the guest's own reboot
    health = node.wait_healthy()
    clock.step("7 failed trial of slot A, back on slot B", started)
    assert booted_slot(admin, node) == "b"
    assert base_marker(admin, node) == "base 2.0.0"
    assert health["version"] == "2.0.0", health
    status, text = ota_status(admin, node)
    base = status["base"]
    assert base["phase"] in ("trial_failed", "rolled_back"), status
    assert e2e_releases.FAILING_REASON in json.dumps(base), status
    assert e2e_releases.FAILING_REASON in text, text
    env = ssh_ok(admin, node, "grub-editenv /boot/grub/grubenv list")
    assert "saved_entry=smechvisor-b" in env and "next_entry=smechvisor" not in env, env


# ---- the standalone chain: build, install, boot, then the steps ------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The run's files; the disk and the bundles (GiBs) go at the end, the logs stay."""
    path = tmp_path_factory.mktemp("e2e-ota")
    yield path
    for big in ("disk", "releases"):
        shutil.rmtree(path / big, ignore_errors=True)


def test_ota_lifecycle_on_an_installed_node(workdir: Path) -> None:
    _prereqs()
    clock = Clock()
    started = time.monotonic()
    releases = e2e_releases.build(workdir / "releases")
    for name, seconds in releases.seconds.items():
        print(f"[e2e]   {name}: {seconds:.0f} s")
    clock.step("1 image (cached) and releases v1, v2, v3 with the CLI", started)

    started = time.monotonic()
    admin = Admin.create(workdir / "admin")
    v1 = releases.v1
    disk, _report = e2e_install.install(
        v1.bundle, v1.bundle.with_suffix(".manifest.json"), releases.pki.root_json,
        workdir / "disk", admin.public_key,
    )  # fmt: skip
    clock.step("install v1 onto the disk", started)

    started = time.monotonic()
    with Machine(disk, workdir / "qemu", firmware="seabios") as node:
        try:
            health = node.boot()
            clock.step("first boot (SeaBIOS, GRUB from the disk)", started)
            assert health["version"] == v1.version, health
            # The first `spk-visor --ssh` records the host key (--accept-new), in step 6.
            step6_update_commits(node, admin, releases.v2, clock)
            step7_bad_base_rolls_back(node, admin, releases.v3, clock)
        finally:
            (workdir / "consoles.log").write_text(node.consoles())
            print(f"[e2e] consoles kept in {workdir / 'consoles.log'}")
    print("[e2e] times: " + ", ".join(f"{k} {v:.0f} s" for k, v in clock.steps.items()))
