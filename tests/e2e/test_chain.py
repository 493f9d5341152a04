"""From a blank machine to a serving, updated node, on the real components (issue 13's test).

Steps 1-4 (build, sign, shim boot, deploy, first boot) are the module fixture `chain`
(conftest.py); the tests below are the later steps, in this file's order (conftest.py
undoes the random shuffle for this directory): they run on the same machine, one after
the other: 5 the node's facts, 6 a committed update (v2: live daemon swap, base in slot
B), 7 a failing base (v3) rolled back by the node itself, 8 the sealed OS, 9 the node
deploying its peer with the release it runs (v2). Each step's wall time is printed and
written to timings.json in the test's tmp directory (and to SPK_E2E_LOGS when set).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.support import e2e_machine, e2e_release
from tests.support.e2e_machine import Chain, Node

pytestmark = pytest.mark.root


def _node_doc(chain: Chain, *, accept_new: bool = False) -> dict[str, Any]:
    run = chain.node.cli("node", "--json", accept_new=accept_new)
    doc: dict[str, Any] = json.loads(run.stdout)
    return doc


def _booted_slot(node: Node) -> str:
    words = node.ssh("cat /proc/cmdline")[1].split()
    slots = [w.split("=", 1)[1] for w in words if w.startswith("smechvisor.slot=")]
    assert len(slots) == 1, words
    return slots[0]


def _base_marker(node: Node) -> str:
    """What the running slot's marker file says ('' for v1's base, which has none)."""
    rc, out, _ = node.ssh(f"cat /{e2e_release.MARKER}", check=False)
    return out.strip() if rc == 0 else ""


def _ota_status(node: Node) -> tuple[dict[str, Any], str]:
    """`spk-visor ota status` on the node (over SSH, as an operator runs it there), as JSON
    and as the text an operator reads."""
    doc: dict[str, Any] = json.loads(node.ssh("spk-visor ota status --json")[1])
    text = node.ssh("COLUMNS=200 spk-visor ota status")[1]
    return doc, " ".join(text.split())


def _grubenv_default_is_b(node: Node) -> None:
    """The committed default names slot B and no one-shot is pending: a plain reboot
    comes back to slot B."""
    env = node.ssh("grub-editenv /boot/grub/grubenv list")[1]
    assert "saved_entry=smechvisor-b" in env and "next_entry=smechvisor" not in env, env


def test_step4_v1_is_installed_and_serving(chain: Chain) -> None:
    """What deploy said it did is what runs: v1's daemon, from slot A."""
    node = chain.node
    health = e2e_machine.health(node.https_port)
    assert health is not None and health["status"] == "ok"
    assert health["version"] == "1.0.0", health  # the release's daemon, not the image's
    report = json.dumps(chain.deploy)
    assert chain.releases["v1"].version in report or "1000000" in report, report
    console = node.qemu.text() if node.qemu else ""
    assert "smechvisor.slot=a" in console or "slot=a" in console, console[-3000:]


def test_step5_the_node_reports_the_qemu_machine(chain: Chain) -> None:
    """`spk-visor --ssh root@127.0.0.1:PORT --accept-new node --json`: the admin's key
    deploy wrote lets them in, the host key is recorded, and the facts are QEMU's."""
    node = chain.node
    known_hosts = node.home / ".ssh" / "known_hosts"
    assert not known_hosts.exists()
    doc = _node_doc(chain, accept_new=True)
    assert f"[127.0.0.1]:{node.ssh_port}" in known_hosts.read_text()
    # The second run needs nothing more: the key is known now.
    again = _node_doc(chain)
    assert again["hostname"] == doc["hostname"] == "e2e-node-1", doc
    assert doc["cpu_threads"] == node.smp, doc
    assert doc["cpu_cores"] * (doc["cpu_threads"] // doc["cpu_cores"]) == node.smp, doc
    # The kernel keeps some of -m for itself; MemTotal is what is left.
    assert 0.8 * node.mem_mib <= doc["memory_total_mb"] <= node.mem_mib, doc
    assert doc["boot_mode"] == "bios"
    rc, _, _ = node.ssh("test -c /dev/kvm", check=False)
    assert doc["kvm_available"] is (rc == 0), doc
    _, nproc, _ = node.ssh("nproc")
    assert int(nproc) == node.smp
    chain.timings.done("5a_node_json")

    # No emulated IOMMU: the node says why VFIO cannot work, in words.
    iommu = node.cli("iommu", "--json", check=False)
    assert iommu.returncode == 3, (iommu.returncode, iommu.stderr)  # 3: not ready
    readiness = json.loads(iommu.stdout)
    assert readiness["ready"] is False and readiness["iommu_groups"] == 0, readiness
    blockers = readiness["blockers"]
    assert blockers and all(isinstance(b, str) and b for b in blockers), readiness
    assert any("group" in b.lower() for b in blockers), blockers

    # The dashboard, through the forwarded 8080, over HTTPS (the node's own certificate).
    status, page = e2e_machine.https_get(node.https_port, "/")
    assert status == 200
    assert b"<html" in page.lower() and b"smechvisor" in page.lower()
    chain.timings.done("5b_iommu_dashboard")


def test_step6_the_v2_update_commits(chain: Chain) -> None:
    """`spk-visor --ssh ... ota push v2.spkb`: the daemon is swapped live (/api/health
    says 2.0.0) and v2's base is staged in slot B (exit 4). After a reboot, GRUB's one-shot
    boots slot B, the boot service's `ota boot-check` commits it, and `ota status` says so."""
    node, v2 = chain.node, chain.releases["v2"]
    push = node.cli("ota", "push", str(v2.bundle), check=False, timeout=1200)
    assert push.returncode == 4, f"exit {push.returncode}\n{push.stdout}\n{push.stderr}"
    health = e2e_machine.health(node.https_port)
    assert health is not None and health["version"] == v2.version, health
    assert _booted_slot(node) == "a"
    status, _ = _ota_status(node)
    assert status["base"]["phase"] == "staged" and status["base"]["slot"] == "b", status
    chain.timings.done("6a_push_v2_daemon_swapped_base_staged")

    health = node.reboot(
        e2e_machine.FIRST_BOOT_TIMEOUT_S,
        expect=re.compile(r"Checking a trial boot of the base system"),
    )
    chain.timings.done("6b_reboot_into_slot_b_committed")
    assert health["version"] == v2.version, health
    assert _booted_slot(node) == "b"
    assert _base_marker(node) == f"base {v2.version}"
    status, text = _ota_status(node)
    base = status["base"]
    assert base["phase"] == "committed" and base["slot"] == "b", status
    assert "committed" in text and "slot b" in text.lower(), text
    # The slot written was this disk's slot B, named by its partition GUID.
    conf = node.ssh("cat /etc/spk-visor/ota.conf")[1]
    slot_b = re.search(r'^b = "(/dev/disk/by-partuuid/[0-9a-f-]+)"$', conf, re.M)
    assert slot_b, conf
    assert node.ssh(f"readlink -f {slot_b.group(1)}")[1].strip() == "/dev/vda4"
    _grubenv_default_is_b(node)
    # What the node runs now is v2: the release it sends to a peer (step 9).
    installed = json.loads(node.ssh("cat /var/lib/spk-visor/ota/installed.json")[1])
    assert installed["manifest"] == v2.manifest_sha256, installed
    assert installed["version"] == v2.version, installed


def test_step7_a_failing_base_rolls_back(chain: Chain) -> None:
    """`ota push v3.spkb`: v3's base carries a required health check that fails. Its
    trial boot (slot A) fails, the node reboots by itself, GRUB's default brings slot B
    back, and `ota status` says why."""
    node, v3 = chain.node, chain.releases["v3"]
    push = node.cli("ota", "push", str(v3.bundle), check=False, timeout=1200)
    assert push.returncode == 4, f"exit {push.returncode}\n{push.stdout}\n{push.stderr}"
    status, _ = _ota_status(node)
    assert status["base"]["phase"] == "staged" and status["base"]["slot"] == "a", status
    chain.timings.done("7a_push_v3_base_staged")

    assert node.qemu is not None
    since = node.console_offset()
    node.request_reboot()
    # The trial boot: slot A, the failing check, and the node reboots by itself (in the
    # same QEMU process: the console goes on).
    timeout = e2e_machine.FIRST_BOOT_TIMEOUT_S
    failed = node.qemu.wait_for(re.compile(re.escape(e2e_release.FAILING_REASON)), timeout, since)
    trial = node.qemu.text()[since : failed.end()]
    assert "smechvisor.slot=a" in trial or "slot A" in trial, trial[-3000:]
    restart = node.qemu.wait_for(re.compile(r"reboot: Restarting system"), timeout, failed.end())
    health = node.wait_healthy(timeout, since=restart.end())
    chain.timings.done("7b_failed_trial_of_slot_a_back_on_slot_b")
    assert _booted_slot(node) == "b"
    assert _base_marker(node) == "base 2.0.0"
    assert health["version"] == "2.0.0", health
    status, text = _ota_status(node)
    base = status["base"]
    assert base["phase"] in ("trial_failed", "rolled_back"), status
    assert e2e_release.FAILING_REASON in json.dumps(base), status
    assert e2e_release.FAILING_REASON in text, text
    _grubenv_default_is_b(node)


def test_step8_the_node_is_sealed(chain: Chain) -> None:
    """system-install and userland-install are refused (exit 3) through the CLI, and on
    the node itself; the package managers say the node is sealed."""
    node = chain.node
    for verb in ("system-install", "userland-install"):
        run = node.cli(verb, check=False)
        assert run.returncode == 3, (verb, run.returncode, run.stderr)
        rc, _, err = node.ssh(f"spk-visor {verb}", check=False)
        assert rc == 3, (verb, rc, err)
    rc, _, err = node.ssh("apt-get install -y curl", check=False)
    assert rc != 0 and "sealed" in err, (rc, err)
    chain.timings.done("8_sealed")


def test_step9_the_node_deploys_its_peer(chain: Chain) -> None:
    """`spk-visor deploy-system-img-copy CODE`, run on the node over SSH, installs a second
    blank machine on the same LAN: found by its broadcast announcement (no --target), sent
    the signed release the node runs, and serving it after its reboot.

    The peer is a UEFI machine (OVMF) where the first node was a BIOS one (SeaBIOS): the
    shim's UEFI boot, the installer's EFI path and the installed disk's UEFI boot are all
    exercised without a second boot of the first node."""
    node = chain.node
    work = chain.work / "peer"
    work.mkdir()
    disk = e2e_machine.blank_disk(work / "disk.raw")
    peer_mac = "52:54:00:e2:e0:09"
    shim = e2e_machine.boot_shim(
        chain.iso, disk, work, receiver_port=None, lan=chain.lan, mac=peer_mac, firmware="ovmf"
    )
    try:
        code = e2e_machine.read_code(shim)
        assert "SPK-SHIM boot: UEFI" in shim.text()
        chain.timings.done("9a_peer_shim_boot_ovmf")
        _, installed, _ = node.ssh("cat /var/lib/spk-visor/ota/installed.json")
        running = json.loads(installed)
        # After steps 6 and 7 the node runs v2 (v3's base was never committed).
        assert running["manifest"] == chain.releases["v2"].manifest_sha256, running
        # The admin's key, as the node has it, for the peer too.
        node.ssh("cp /data/etc/ssh/authorized_keys/root /tmp/admin.pub")
        rc, out, err = node.ssh(
            f"spk-visor deploy-system-img-copy {code} --hostname e2e-node-2 "
            "--authorized-key /tmp/admin.pub --json",
            check=False,
            timeout=e2e_machine.PEER_INSTALL_TIMEOUT_S,
        )
        assert rc == 0, f"exit {rc}:\n{out[-3000:]}\n{err[-3000:]}\npeer:\n{shim.text()[-3000:]}"
        report = json.dumps(json.loads(out))
        # It sent what it runs: the manifest OTA records as installed, nothing re-signed.
        assert running["manifest"] in report, report
        assert str(chain.lan.address_of(peer_mac)) in report, report
        chain.timings.done("9b_peer_install")
        assert shim.wait_exit(120) is not None, f"the peer did not reboot:\n{shim.text()[-3000:]}"
    finally:
        shim.stop()
    peer = e2e_machine.Node(work, disk, node.home, node.releases, lan=chain.lan, mac=peer_mac)
    try:
        peer.boot("ovmf")
        health = peer.wait_healthy(e2e_machine.FIRST_BOOT_TIMEOUT_S)
        assert health["version"] == running["version"], (health, running)
        chain.timings.done("9c_peer_first_boot_ovmf")
        doc = json.loads(peer.cli("node", "--json", accept_new=True).stdout)
        assert doc["hostname"] == "e2e-node-2" and doc["boot_mode"] == "uefi", doc
        # v2 whole: its daemon, and its base (the marker) in the peer's slot A.
        assert health["version"] == chain.releases["v2"].version, health
        assert _base_marker(peer) == "base 2.0.0"
        assert _booted_slot(peer) == "a"
    finally:
        peer.stop()
