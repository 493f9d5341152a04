"""`spk-visor` over HTTP against the real smechvisord (a subprocess on port 0, with the
cloud-hypervisor stand-in and fixture sysroots): every command, human and --json output,
the --json schemas, and the errors people hit."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import Result, TtyInput, run
from tests.support.daemon import Daemon, DaemonEnv, wait_for
from tests.support.schemas import (
    CAPABILITY_KEYS,
    CHECK_KEYS,
    CONSOLE_KEYS,
    DRY_RUN_KEYS,
    EXIT_KEYS,
    IOMMU_KEYS,
    NODE_KEYS,
    PCI_KEYS,
    REBOOT_KEYS,
    SHUTDOWN_KEYS,
    STEP_KEYS,
    UNMANAGED_VM_KEYS,
    VFIO_CHANGE_KEYS,
    VFIO_STATUS_KEYS,
    VM_KEYS,
    VMM_KEYS,
)
from tests.support.vmhelpers import foreign_vmm

ROOT = Path(__file__).resolve().parents[2]

SERVICE_HINT = "is the service running? rc-service smechvisord status"


def cli(d: Daemon, *argv: str, **kw: Any) -> Result:
    return run("--node", d.url, "--token", d.token, *argv, **kw)


def cli_json(d: Daemon, *argv: str) -> Any:
    r = cli(d, "--json", *argv)
    assert r.code == 0, r
    return json.loads(r.out)


def create(d: Daemon, env: DaemonEnv, name: str = "web-1", *extra: str) -> Result:
    r = cli(d, "vm", "create", "--cpus", "2", "--memory", "512M", "--disk", str(env.disk),
            "--name", name, *extra)  # fmt: skip
    assert r.code == 0, r
    return r


def ours(vms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The daemon's own VMs: VMMs of other tests on this machine show up as unmanaged."""
    return [vm for vm in vms if vm["managed"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- node ------------------------------------------------------------------------------


def test_node(daemon: Daemon) -> None:
    r = cli(daemon, "node")
    assert r.code == 0 and r.err == ""
    assert "smech-01 (smechvisord " in r.out
    assert "8 cores / 16 threads" in r.out
    assert "1 day 2 h" in r.out  # 93784 s, in units people read
    doc = cli_json(daemon, "node")
    assert set(doc) == NODE_KEYS
    assert set(doc["vmm"]) == VMM_KEYS
    assert set(doc["capabilities"]) == CAPABILITY_KEYS


def test_entry_point_as_a_subprocess(daemon: Daemon) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_VISOR_")}
    env["SPK_VISOR_CONFIG"] = "/nonexistent/config.toml"
    env["SPK_VISOR_TOKEN"] = daemon.token
    out = subprocess.run(
        [sys.executable, "-m", "spk_visor", "--node", daemon.url, "--json", "node"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == NODE_KEYS


# ---- VMs -------------------------------------------------------------------------------


def test_vm_lifecycle(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    d, env = daemon, daemon_env
    r = cli(d, "vm", "list")
    assert r.code == 0

    # Dry run: the exact argv, nothing started.
    r = cli(d, "vm", "create", "--cpus", "2", "--memory", "1G", "--disk", str(env.disk),
            "--name", "web-1", "--dry-run")  # fmt: skip
    assert r.code == 0, r
    assert r.out.splitlines()[0] == "VM web-1 would run:"
    assert "--cpus boot=2 --memory size=1024M" in r.out
    assert f"--disk path={env.disk}" in r.out
    doc = cli_json(d, "vm", "create", "--cpus", "2", "--memory", "1024", "--disk",
                   str(env.disk), "--name", "web-1", "--dry-run")  # fmt: skip
    assert set(doc) == DRY_RUN_KEYS and doc["problems"] == []
    assert ours(cli_json(d, "vm", "list")) == []

    r = create(d, env)
    assert r.out.startswith("Created VM web-1: running, pid ")
    assert "2 vCPUs, 512 MiB" in r.out
    assert r.err == ""  # no progress bar: stderr is not a terminal

    r = cli(d, "vm", "list")
    header, *rows = r.out.splitlines()
    assert header.split() == ["ID", "STATE", "PID", "CPUS", "MEMORY", "CPU%", "DISK"]
    row = next(line for line in rows if line.startswith("web-1 "))
    assert row.split()[1] == "running" and "512 MiB" in row and str(env.disk) in row
    vms = ours(cli_json(d, "vm", "list"))
    assert [vm["id"] for vm in vms] == ["web-1"]
    assert set(vms[0]) == VM_KEYS

    r = cli(d, "vm", "show", "web-1")
    assert r.code == 0
    fields = dict(line.split(None, 1) for line in r.out.splitlines() if " " in line.strip())
    assert fields["State"].strip() == "running"
    assert fields["Memory"].strip() == "512 MiB"
    vm = cli_json(d, "vm", "show", "web-1")
    assert set(vm) == VM_KEYS
    pid = vm["pid"]

    r = cli(d, "vm", "pause", "web-1")
    assert (r.code, r.out) == (0, f"VM web-1: paused (pid {pid})\n")
    r = cli(d, "vm", "resume", "web-1")
    assert (r.code, r.out) == (0, f"VM web-1: running (pid {pid})\n")
    assert cli_json(d, "vm", "reboot", "web-1")["pid"] == pid

    r = cli(d, "vm", "console", "web-1")
    assert r.code == 0 and "login:" in r.out and r.out.endswith("\n")
    console = cli_json(d, "vm", "console", "web-1")
    assert set(console) == CONSOLE_KEYS and console["next_offset"] == console["size"]

    # Deleting a running VM is refused before anyone is asked.
    r = cli(d, "vm", "delete", "web-1", "--yes")
    assert r.code == 3
    assert r.err_lines == [
        "spk-visor: error: VM web-1 is running; it must be stopped before it is deleted",
        "spk-visor vm shutdown web-1",
    ]

    r = cli(d, "vm", "shutdown", "web-1", "--timeout", "10")
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].startswith("VM web-1: stopped (graceful shutdown, ")
    assert lines[1] == "  1. ACPI power button: sent; the VMM exited"
    assert lines[2] == "  exit: the VMM exited with code 0"
    assert r.err == ""

    vm = cli_json(d, "vm", "start", "web-1")
    assert vm["state"] == "running" and vm["pid"] != pid
    vm = cli_json(d, "vm", "stop", "web-1")
    assert set(vm) == VM_KEYS
    assert vm["state"] == "stopped"
    assert set(vm["last_shutdown"]) == SHUTDOWN_KEYS
    assert vm["last_shutdown"]["graceful"] is False
    assert all(set(step) == STEP_KEYS for step in vm["last_shutdown"]["steps"])
    assert set(vm["exit"]) == EXIT_KEYS
    r = cli(d, "vm", "show", "web-1")
    assert "Last shutdown  forced, " in r.out

    # Delete asks; a script without --yes is refused, and "no" changes nothing.
    r = cli(d, "vm", "delete", "web-1")
    assert r.code == 3
    assert r.err_lines == [
        "spk-visor: error: refusing to delete VM web-1 without confirmation: "
        "stdin is not a terminal",
        "pass --yes to confirm from a script",
    ]
    r = cli(d, "vm", "delete", "web-1", stdin=TtyInput("n\n"))
    assert r.code == 3
    assert "Delete VM web-1 (stopped)?" in r.err
    # The prompt has no newline after it: a terminal would echo the answer.
    assert r.err.endswith("[y/N] spk-visor: error: VM web-1 was not deleted: not confirmed\n")
    assert cli(d, "vm", "show", "web-1").code == 0
    r = cli(d, "vm", "delete", "web-1", stdin=TtyInput("y\n"))
    assert (r.code, r.out) == (0, "Deleted VM web-1.\n")

    r = cli(d, "vm", "show", "web-1")
    assert r.code == 2
    assert r.err_lines == [f"spk-visor: error: {d.url}: no VM named 'web-1'"]


def test_vm_delete_yes_and_json(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    create(daemon, daemon_env, "db")
    assert cli(daemon, "vm", "stop", "db").code == 0
    assert cli_json(daemon, "vm", "delete", "db", "--yes") == {"deleted": "db"}
    assert ours(cli_json(daemon, "vm", "list")) == []


def test_vm_errors_from_the_daemon(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    d, env = daemon, daemon_env
    outside = env.root / "elsewhere.img"
    outside.write_bytes(b"\0" * 4096)
    r = cli(d, "vm", "create", "--cpus", "1", "--memory", "512", "--disk", str(outside))
    assert r.code == 2
    assert r.err_lines[0].startswith(f"spk-visor: error: {d.url}: disk: {outside} is outside")
    r = cli(d, "vm", "create", "--cpus", "1", "--memory", "512", "--disk", "disk.img")
    assert r.code == 2
    assert r.err_lines == [f"spk-visor: error: {d.url}: disk: must be an absolute path"]
    r = cli(d, "vm", "pause", "nope")
    assert r.code == 2 and r.err_lines == [f"spk-visor: error: {d.url}: no VM named 'nope'"]

    create(d, env, "web-1")
    # A dry run that would be refused says why, and exits 3.
    r = cli(d, "vm", "create", "--cpus", "1", "--memory", "512", "--disk", str(env.disk),
            "--name", "web-1", "--dry-run")  # fmt: skip
    assert r.code == 3
    assert r.out.splitlines()[-3:] == [
        "It would be refused now:",
        "  - a VM named 'web-1' already exists",
        f"  - {env.disk} is in use by VM web-1 (as {env.disk})",
    ]
    r = cli(d, "vm", "resume", "web-1")
    assert r.code == 3
    assert r.err_lines[0].startswith(f"spk-visor: error: {d.url}: VM web-1 is running")


def test_vm_list_marks_unmanaged_vmms(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    with foreign_vmm(daemon_env) as proc:
        row = f"pid-{proc.pid} (unmanaged)"

        def listed() -> str | None:
            out = cli(daemon, "vm", "list").out
            return next((line for line in out.splitlines() if line.startswith(row)), None)

        line = wait_for(listed, timeout=10)
        assert line is not None
        assert line[len(row) :].split()[:5] == ["running", str(proc.pid), "3", "2", "GiB"]
        vms = cli_json(daemon, "vm", "list")
        foreign = next(vm for vm in vms if vm["pid"] == proc.pid)
        assert set(foreign) == UNMANAGED_VM_KEYS
        # Shown by the id `vm list` gives it; not ours to act on (exit 3, refused).
        r = cli(daemon, "vm", "show", f"pid-{proc.pid}")
        assert r.code == 0 and "no: a VMM that smechvisord did not start" in r.out, r
        assert cli(daemon, "vm", "stop", f"pid-{proc.pid}").code == 3


@pytest.mark.parametrize("daemon_env", ["intel-ready"], indirect=True)
def test_shutdown_shows_the_escalation(daemon_env: DaemonEnv) -> None:
    daemon_env.extra_env["CH_STANDIN_IGNORE_POWER_BUTTON"] = "1"
    d = Daemon(daemon_env)
    try:
        create(d, daemon_env, "stubborn")
        # --timeout 1 lets the guest ignore the button for a second; the global --timeout
        # (HTTP) stays short: the client must still wait for the whole ladder.
        r = run("--node", d.url, "--token", d.token, "--timeout", "2",
                "vm", "shutdown", "stubborn", "--timeout", "1")  # fmt: skip
        assert r.code == 0, r
        assert r.out.splitlines()[1:] == [
            "  1. ACPI power button: sent; still running",
            "  2. vm.shutdown, then vmm.shutdown: sent; the VMM exited",
            "  exit: the VMM exited with code 0",
        ]
    finally:
        d.stop()


def follow_then_ctrl_c(d: Daemon, argv: list[str], seconds: float, before: Any = None) -> Result:
    """Run the CLI as its own process, send it a real Ctrl-C (SIGINT, by its PID) after
    `seconds`; `before` runs half-way."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "spk_visor", "--node", d.url, "--token", d.token, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(seconds / 2)
        if before is not None:
            before()
        time.sleep(seconds / 2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    return Result(proc.returncode, out, err)


def test_console_follow_until_ctrl_c(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    create(daemon, daemon_env, "chatty")
    # The guest reboots while we follow: its second boot must show up, without a restart
    # of the command. The poll interval is bounded (2 s), so 6 s is plenty.
    started = time.monotonic()
    r = follow_then_ctrl_c(
        daemon,
        ["vm", "console", "chatty", "--follow"],
        6,
        lambda: daemon.post("/api/vms/chatty/reboot"),
    )
    # Ctrl-C is how following ends: exit 130 (DESIGN.md), no noise after the log.
    assert r.code == 130, r
    assert "Traceback" not in r.err
    assert r.out.count("login:") == 2, r.out
    assert time.monotonic() - started < 15


def test_console_follow_json_lines(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    create(daemon, daemon_env, "chatty")
    r = follow_then_ctrl_c(daemon, ["--json", "vm", "console", "chatty", "--follow"], 4)
    assert r.code == 130, r
    lines = r.out.splitlines()
    assert len(lines) == 1  # the tail only: a quiet guest adds no empty chunks
    assert set(json.loads(lines[0])) == CONSOLE_KEYS


def follow_until_it_ends(
    d: Daemon, argv: list[str], before: Any = None, limit: float = 30, ready: str = "login:"
) -> Result:
    """Run the CLI as its own process and wait for it to end by itself. `before` runs
    once it is following: once the tail (`ready` in it) is on its stdout, so the CLI has
    its first console document (a fixed sleep may end before it asked, on a loaded
    machine). A CLI still running after `limit` seconds is killed and reported as code
    None, so a follow that never ends fails the test instead of hanging it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "spk_visor", "--node", d.url, "--token", d.token, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}

    def drain(fd: int) -> None:
        while chunk := os.read(fd, 65536):
            chunks[fd].append(chunk)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in chunks]
    for t in readers:
        t.start()
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    code: int | None = None
    try:
        if before is not None:
            following = wait_for(
                lambda: ready.encode() in b"".join(chunks[out_fd]) or proc.poll() is not None,
                timeout=30,
            )
            assert following and proc.poll() is None, (
                f"the CLI did not start following: {b''.join(chunks[err_fd])!r}"
            )
            before()
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for t in readers:
            t.join(timeout=5)
        proc.stdout.close()
        proc.stderr.close()
    text = {fd: b"".join(c).decode(errors="replace") for fd, c in chunks.items()}
    return Result(code, text[out_fd], text[err_fd])  # type: ignore[arg-type]


def test_console_follow_on_a_stopped_vm_prints_the_log_and_ends(
    daemon: Daemon, daemon_env: DaemonEnv
) -> None:
    create(daemon, daemon_env, "idle")
    assert daemon.post("/api/vms/idle/stop").status == 200
    r = follow_until_it_ends(daemon, ["vm", "console", "idle", "--follow"])
    # Nothing more will come: following a stopped VM is refused (3) after its log.
    assert r.code == 3, r
    assert "login:" in r.out
    assert r.err_lines == [
        "spk-visor: error: VM idle is stopped: there is nothing to follow (spk-visor vm start idle)"
    ]


def test_console_follow_ends_when_the_vm_stops(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    create(daemon, daemon_env, "brief")
    r = follow_until_it_ends(
        daemon,
        ["vm", "console", "brief", "--follow"],
        lambda: daemon.post("/api/vms/brief/shutdown", {"timeout_seconds": 10}),
    )
    # The follow ran to its natural end: 0, and one line on stderr says why it ended.
    assert r.code == 0, r
    assert "login:" in r.out
    assert r.err_lines == ["VM brief is stopped: its console has ended."]


def test_console_follow_ends_when_the_vm_is_deleted(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    create(daemon, daemon_env, "gone")

    def stop_and_delete() -> None:
        # Within one poll interval, so the follower may see either the stop or the 404.
        assert daemon.post("/api/vms/gone/stop").status == 200
        assert daemon.request("DELETE", "/api/vms/gone").status == 200

    r = follow_until_it_ends(
        daemon, ["--json", "vm", "console", "gone", "--follow"], stop_and_delete
    )
    assert r.code == 0, r
    assert set(json.loads(r.out.splitlines()[0])) == CONSOLE_KEYS
    assert r.err_lines in (
        ["VM gone is stopped: its console has ended."],
        ["VM gone was deleted: its console has ended."],
    )


# ---- IOMMU, PCI, VFIO ------------------------------------------------------------------


def test_iommu_ready(daemon: Daemon) -> None:
    r = cli(daemon, "iommu")
    assert r.code == 0
    assert r.out.splitlines() == [
        "IOMMU: ready for passthrough",
        "  [ok]   CPU virtualization: vmx (Intel VT-x) among the CPU flags",
        "  [ok]   IOMMU groups: 6 IOMMU groups under /sys/kernel/iommu_groups",
        "  [ok]   Kernel command line: intel_iommu=on on the kernel command line, with iommu=pt",
    ]
    doc = cli_json(daemon, "iommu")
    assert set(doc) == IOMMU_KEYS
    assert [set(check) for check in doc["checks"]] == [CHECK_KEYS] * 3


@pytest.mark.parametrize("daemon_env", ["amd-no-iommu"], indirect=True)
def test_iommu_not_ready(daemon: Daemon) -> None:
    r = cli(daemon, "iommu")
    assert r.code == 3
    assert r.out.splitlines() == [
        "IOMMU: not ready (1 of 3 checks failed)",
        "  [ok]   CPU virtualization: svm (AMD-V) among the CPU flags",
        "  [FAIL] IOMMU groups: no groups under /sys/kernel/iommu_groups",
        "         fix: Enable VT-d / AMD-Vi in firmware setup",
        "  [ok]   Kernel command line: intel_iommu=on and amd_iommu=on on the kernel "
        "command line, with iommu=pt",
    ]
    r = cli(daemon, "--json", "iommu")
    assert r.code == 3  # the same exit code for scripts
    assert json.loads(r.out)["ready"] is False


def test_pci(daemon: Daemon) -> None:
    r = cli(daemon, "pci")
    assert r.code == 0
    header, *rows = r.out.splitlines()
    assert re.split(r"\s{2,}", header) == [
        "ADDRESS", "CLASS", "PCI ID", "DRIVER", "GROUP", "CRITICAL", "VIABLE",
    ]  # fmt: skip
    devices = cli_json(daemon, "pci")
    table, notes = rows[: len(devices)], rows[len(devices) :]
    nvme = next(line for line in table if line.startswith("0000:3b:00.0"))
    assert "144d:a80a" in nvme and "nvme" in nvme
    cells = re.split(r"\s{2,}", nvme)
    (root_fs,) = [n for n in notes if n.endswith("] it carries the root filesystem")]
    assert cells[-2:] == ["yes", f"no {root_fs.split()[0]}"]
    usb = next(line for line in table if line.startswith("0000:00:14.0"))
    assert usb.endswith("yes")
    # Each reason once, numbered in order of first use.
    assert [n.split("]")[0] for n in notes] == [f"[{i}" for i in range(1, len(notes) + 1)]


@pytest.mark.parametrize("daemon_env", ["amd-no-iommu", "intel-ready"], indirect=True)
def test_pci_fits_80_columns_and_says_a_shared_reason_once(daemon: Daemon) -> None:
    """Without an IOMMU every device has the same long reason: it is one numbered note,
    not a sentence on every row, and every line fits COLUMNS=80."""
    r = cli(daemon, "pci", env={"COLUMNS": "80"})
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert max(len(line) for line in lines) <= 80, r.out
    devices = cli_json(daemon, "pci")
    reasons = {reason for dev in devices for reason in dev["reasons"]}
    text = " ".join(" ".join(lines).split())  # wrapped notes read as one text again
    for reason in reasons:
        assert text.count(reason) == 1, reason
    # Absent values are words: no IOMMU group is "none", not "-" or "None".
    cells = [re.split(r"\s{2,}", line) for line in lines[1:] if line.startswith("0000:")]
    groups = {cell[4] for cell in cells}
    assert "-" not in groups and "None" not in groups
    if any(dev["iommu_group"] is None for dev in devices):
        assert "none" in groups
    assert all(set(dev) == PCI_KEYS for dev in devices)


def test_vfio_on_a_ready_node(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    r = cli(daemon, "vfio", "status")
    assert (r.code, r.out) == (0, "vfio-pci: not loaded\nIOMMU:    ready\n")
    assert set(cli_json(daemon, "vfio", "status")) == VFIO_STATUS_KEYS

    r = cli(daemon, "vfio", "enable")
    assert r.code == 0, r
    assert r.out.splitlines()[0].startswith("Enabled vfio-pci: ran ")
    assert r.out.splitlines()[0].endswith("record-command vfio-pci")
    assert daemon_env.recorded() == [[str(Path(daemon_env.env()["SMECHVISORD_MODPROBE"])),
                                      "vfio-pci"]]  # fmt: skip
    doc = cli_json(daemon, "vfio", "enable")
    assert set(doc) == VFIO_CHANGE_KEYS and doc["enabled"] is True

    # The fixture's module list does not change, so disabling finds nothing to unload.
    r = cli(daemon, "vfio", "disable")
    assert (r.code, r.out) == (0, "vfio-pci is not loaded; nothing changed.\n")


@pytest.mark.parametrize("daemon_env", ["amd-no-iommu"], indirect=True)
def test_vfio_enable_refused_while_the_iommu_is_not_ready(
    daemon: Daemon, daemon_env: DaemonEnv
) -> None:
    r = cli(daemon, "vfio", "enable")
    assert r.code == 3
    assert r.out == ""
    assert r.err_lines == [
        f"spk-visor: error: {daemon.url}: vfio-pci was not loaded: the IOMMU is not ready:",
        "  - IOMMU groups are empty: enable VT-d / AMD-Vi in firmware setup",
        "`spk-visor iommu` shows each check and how to fix it",
    ]
    assert daemon_env.recorded() == []
    r = cli(daemon, "vfio", "status")
    assert r.out.splitlines() == [
        "vfio-pci: not loaded",
        "IOMMU:    not ready",
        "  - IOMMU groups are empty: enable VT-d / AMD-Vi in firmware setup",
    ]


# ---- reboot into firmware setup --------------------------------------------------------


def reboots(env: DaemonEnv) -> list[list[str]]:
    return [argv for argv in env.recorded() if argv[-1] == "reboot"]


def test_reboot_uefi_asks_first(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    r = cli(daemon, "reboot-uefi")
    assert r.code == 3
    assert r.err_lines == [
        f"spk-visor: error: refusing to reboot {daemon.url} without confirmation: "
        "stdin is not a terminal",
        "pass --yes to confirm from a script",
    ]
    r = cli(daemon, "reboot-uefi", stdin=TtyInput("n\n"))
    assert r.code == 3
    # "no VM is running.", or with other tests' VMMs on this machine (unmanaged, so
    # named in the question too) "no VM of smechvisord's is running; ...".
    assert f"Reboot {daemon.url} into firmware setup? no VM " in r.err
    assert r.err.endswith(f"[y/N] spk-visor: error: {daemon.url} was not rebooted: not confirmed\n")
    assert reboots(daemon_env) == []


def test_reboot_uefi_yes(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    create(daemon, daemon_env, "web-1")
    r = cli(daemon, "reboot-uefi", "--yes", "--timeout", "10")
    assert r.code == 0, r
    assert r.out.splitlines() == [
        f"{daemon.url} is rebooting into firmware setup.",
        "  VM web-1: stopped",
    ]
    assert len(reboots(daemon_env)) == 1
    vm = cli_json(daemon, "vm", "show", "web-1")
    assert vm["state"] == "stopped" and vm["last_shutdown"]["graceful"] is True


def test_reboot_uefi_confirmed_on_a_terminal(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    r = cli(daemon, "--json", "reboot-uefi", stdin=TtyInput("y\n"))
    assert r.code == 0, r
    assert set(json.loads(r.out)) == REBOOT_KEYS  # the prompt went to stderr
    assert len(reboots(daemon_env)) == 1


@pytest.mark.parametrize("daemon_env", ["bios-host"], indirect=True)
def test_reboot_uefi_unsupported(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    r = cli(daemon, "reboot-uefi", "--yes")
    assert r.code == 3
    assert len(r.err_lines) == 1
    assert r.err_lines[0].startswith(
        f"spk-visor: error: {daemon.url}: cannot reboot into firmware setup: "
        "the node booted in legacy BIOS mode"
    )
    assert reboots(daemon_env) == []


# ---- errors people hit -----------------------------------------------------------------


def test_daemon_not_running() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["node"], ["vm", "list"], ["iommu"]):
        r = run("--node", url, "--token", "t", *argv)
        assert r.code == 7
        assert r.err_lines == [f"spk-visor: error: connection refused at {url}", SERVICE_HINT]


def test_daemon_not_running_and_no_token() -> None:
    # Both are wrong; "not running" is what to fix first.
    url = f"http://127.0.0.1:{free_port()}"
    r = run("--node", url, "vm", "list")
    assert r.code == 7
    assert r.err_lines[0] == f"spk-visor: error: connection refused at {url}"


def test_wrong_token(daemon: Daemon) -> None:
    r = run("--node", daemon.url, "--token", "not-the-token", "vm", "list")
    assert r.code == 2
    assert r.err_lines[0] == (
        f"spk-visor: error: {daemon.url}: the node refused the token (token looked for in: --token)"
    )
    # The hint said "pass --token", which the user had just done: the token is wrong.
    assert r.err_lines[1] == (
        "it is not this node's token: copy it again from /etc/smechvisord/token on the node"
    )
    r = run("--node", daemon.url, "pci", env={"SPK_VISOR_TOKEN": "nope"})
    assert r.code == 2
    assert r.err_lines[0] == (
        f"spk-visor: error: {daemon.url}: the node refused the token "
        "(token looked for in: SPK_VISOR_TOKEN)"
    )


def test_missing_token(daemon: Daemon) -> None:
    r = run("--node", daemon.url, "iommu")
    assert r.code == 2
    assert r.err_lines == [
        f"spk-visor: error: {daemon.url}: no API token found "
        "(token looked for in: --token, SPK_VISOR_TOKEN)",
        "pass --token or set SPK_VISOR_TOKEN; on the node the token is in /etc/smechvisord/token",
    ]


def test_token_file_from_the_config(daemon: Daemon, daemon_env: DaemonEnv, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[nodes.alpha]\nurl = "{daemon.url}"\ntoken_file = "{daemon_env.token_file}"\n'
    )
    r = run("--node", "alpha", "vfio", "status", env={"SPK_VISOR_CONFIG": str(config)})
    assert r.code == 0, r
    wrong = tmp_path / "wrong.token"
    wrong.write_text("nope\n")
    config.write_text(f'[nodes.alpha]\nurl = "{daemon.url}"\ntoken_file = "{wrong}"\n')
    r = run("--node", "alpha", "vfio", "status", env={"SPK_VISOR_CONFIG": str(config)})
    assert r.code == 2
    assert r.err_lines[0].endswith(f"(token looked for in: --token, SPK_VISOR_TOKEN, {wrong})")


class _HtmlHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><body>Welcome to nginx!</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def html_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_something_else_answers(html_server: str) -> None:
    r = run("--node", html_server, "--token", "t", "vm", "list")
    assert r.code == 2
    assert r.err_lines == [
        f"spk-visor: error: {html_server}/api/vms answered HTTP 200 with text/html, "
        "not smechvisord's JSON",
        "check the URL and port: is this a SmechVisor node?",
    ]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 that no CA signed."""
    import datetime  # noqa: PLC0415
    import ipaddress  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smechvisor-node")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "node.crt", tmp_path / "node.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
def https_node(tmp_path: Path) -> Iterator[str]:
    """An https node with a self-signed certificate: the handshake is all it serves."""
    import ssl  # noqa: PLC0415

    cert_file, key_file = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                conn.settimeout(5)
                # The handshake is all a verifying client gets to: it must hang up here.
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    listener.close()


def test_https_refuses_an_unknown_certificate_by_default(https_node: str) -> None:
    # The token must not reach a node whose certificate is neither pinned nor verified,
    # and a refused certificate is a verification failure (exit 3), not a network hiccup
    # to retry (7). Pinning itself: tests/integration/test_tls.py.
    r = run("--node", https_node, "--token", "0123456789abcdef", "node")
    assert r.code == 3, r
    assert r.out == ""
    where = https_node.removeprefix("https://")
    assert r.err_lines[0].startswith(
        f"spk-visor: error: {https_node}: unknown TLS certificate for {where}: SHA256 "
    )
    assert "--accept-new" in r.err_lines[1]
    # Where to compare: a command on the node's PATH (the image links it through `current`).
    assert "on the node: smechvisord --print-fingerprint" in r.err


def test_https_with_ca_file_verifies_the_certificate(https_node: str, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other_ca, _ = _self_signed(tmp_path / "other")
    r = run("--node", https_node, "--token", "0123456789abcdef", "--ca-file", str(other_ca), "node")
    assert r.code == 3, r
    assert r.out == ""
    assert r.err_lines[0] == (
        f"spk-visor: error: {https_node}: the node's TLS certificate failed verification: "
        "self-signed certificate"
    )


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    listener.close()


def test_timeout(silent_server: str) -> None:
    r = run("--node", silent_server, "--token", "t", "--timeout", "1", "node")
    assert r.code == 7
    assert r.err_lines == [
        f"spk-visor: error: no answer from {silent_server} within 1 s",
        "the node may be overloaded; raise --timeout",
    ]
