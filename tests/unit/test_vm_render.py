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
