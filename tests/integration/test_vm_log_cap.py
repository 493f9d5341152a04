"""A guest cannot fill the node's disk through its serial port (or by making its VMM log
without end): the daemon keeps each of a VM's logs to SMECHVISORD_VM_LOG_MAX_MB of disk,
dropping the oldest output, and `vm console` still shows the newest output (never the
dropped part as NUL bytes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import run
from tests.support.daemon import Daemon, DaemonEnv, kill_vmms, wait_for
from tests.support.vmhelpers import create_vm

FLOOD_MIB = 8


@pytest.fixture
def noisy(tmp_path: Path) -> Iterator[tuple[Daemon, DaemonEnv]]:
    env = DaemonEnv(tmp_path / "node")
    env.extra_env.update(SMECHVISORD_VM_LOG_MAX_MB="1", CH_STANDIN_SERIAL_FLOOD_MIB=str(FLOOD_MIB))
    d = Daemon(env)
    yield d, env
    d.stop()
    kill_vmms(env.run_dir)
    env.cleanup()


def test_a_flooding_guest_keeps_its_serial_log_small(noisy: tuple[Daemon, DaemonEnv]) -> None:
    d, env = noisy
    create_vm(d, env, name="chatty")
    log = env.state_dir / "machines" / "chatty" / "serial.log"

    def done() -> bool:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 64))
            return b"flood done" in f.read()

    assert wait_for(done, timeout=60, interval=0.2), "the guest never finished its flood"
    assert log.stat().st_size > FLOOD_MIB << 19  # the guest did write that much
    # The daemon notices within a monitor pass (0.5 s).
    on_disk = lambda: log.stat().st_blocks * 512  # noqa: E731
    assert wait_for(lambda: on_disk() <= 2 << 20, timeout=10), on_disk()

    r = run("--node", d.url, "--token", d.token, "vm", "console", "chatty")
    assert r.code == 0, r
    assert r.out.rstrip().endswith("flood done") and "\0" not in r.out
    # From the start of the log: the first bytes still there, not the dropped ones.
    doc = d.get("/api/vms/chatty/console?offset=0&max_bytes=4096").json
    assert doc["data"] and "\0" not in doc["data"], doc["data"][:80]
    assert doc["offset"] > 0 and doc["offset"] % 4096 == 0
    assert os.path.getsize(log) == doc["size"]


def test_the_vmm_log_and_event_log_are_kept_small_too(noisy: tuple[Daemon, DaemonEnv]) -> None:
    d, env = noisy
    create_vm(d, env, name="chatty")
    vm_dir = env.state_dir / "machines" / "chatty"
    # What a guest rebooting without end makes its VMM write, a few MiB at once here.
    for name in ("vmm.log", "events.jsonl"):
        with (vm_dir / name).open("ab") as f:
            for _ in range(4096):
                f.write(b"x" * 1023 + b"\n")
    for name in ("vmm.log", "events.jsonl"):
        path = vm_dir / name
        assert wait_for(lambda p=path: p.stat().st_blocks * 512 <= 2 << 20, timeout=10), name
        assert path.stat().st_size >= 4 << 20
