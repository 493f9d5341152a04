"""How `spk-visor vm` words the daemon's documents for people."""

from __future__ import annotations

from spk_visor.commands import vm


def doc(cpus: int) -> dict[str, object]:
    return {"id": "web-1", "state": "running", "pid": 42, "cpus": cpus, "memory_mb": 512,
            "disk": "/var/lib/smechvisor/images/a.img"}  # fmt: skip


def test_created_line_counts_vcpus_in_words() -> None:
    # It said "1 vCPUs".
    assert vm.created_line(doc(1)) == (
        "Created VM web-1: running, pid 42, 1 vCPU, 512 MiB, disk /var/lib/smechvisor/images/a.img"
    )
    assert ", 4 vCPUs, " in vm.created_line(doc(4))


def shutdown_doc(*steps: tuple[str, bool], graceful: bool = True) -> dict[str, object]:
    return {
        "id": "web-1",
        "state": "stopped",
        "exit": {"reason": "the VMM exited with code 0"},
        "last_shutdown": {
            "graceful": graceful,  # what was asked for, not how it ended
            "seconds": 31.2,
            "steps": [{"step": s, "result": "sent", "exited": e} for s, e in steps],
        },
    }


def test_a_shutdown_the_guest_ignored_is_not_called_graceful() -> None:
    # The guest ignored the power button and had its power pulled; it said "graceful".
    doc = shutdown_doc(("vm.power-button", False), ("vm.shutdown+vmm.shutdown", True))
    head = vm.steps_report(doc).splitlines()[0]
    assert head == "VM web-1: stopped (forced: the guest did not power off by itself, 31.2 s)"
    assert vm.shutdown_summary(doc["last_shutdown"]).startswith(  # type: ignore[arg-type]
        "forced: the guest did not power off by itself, 31.2 s, ended by vm.shutdown"
    )


def test_a_shutdown_the_guest_obeyed_is_graceful_and_a_stop_is_forced() -> None:
    doc = shutdown_doc(("vm.power-button", True))
    assert vm.steps_report(doc).splitlines()[0] == "VM web-1: stopped (graceful shutdown, 31.2 s)"
    doc = shutdown_doc(("vm.shutdown+vmm.shutdown", True), graceful=False)
    assert vm.steps_report(doc).splitlines()[0] == "VM web-1: stopped (forced stop, 31.2 s)"
