"""From a blank machine to a serving node, on the real components (issue 13's test).

Steps 1-4 (build, sign, shim boot, deploy, first boot) are the module fixture `chain`
(conftest.py); the tests below are the later steps, in this file's order (conftest.py
undoes the random shuffle for this directory): they run on the same machine, one after
the other. Each step's wall time is printed and written to timings.json in the test's
tmp directory (and to SPK_E2E_LOGS when set).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support import e2e_machine
from tests.support.e2e_machine import Chain

pytestmark = pytest.mark.root


def _node_doc(chain: Chain, *, accept_new: bool = False) -> dict[str, Any]:
    run = chain.node.cli("node", "--json", accept_new=accept_new)
    doc: dict[str, Any] = json.loads(run.stdout)
    return doc


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
    finally:
        peer.stop()
