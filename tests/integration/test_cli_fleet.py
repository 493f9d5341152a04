"""`--fleet GROUP` against three real daemons, one of them stopped: one row per node, the
failed node named in its own error row, a non-zero exit, and --json keyed by node."""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import Result, run
from tests.support.daemon import Daemon, DaemonEnv, kill_vmms
from tests.support.vmhelpers import create_vm

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("alpha", "beta", "gamma")
KINDS = {"alpha": "intel-ready", "beta": "amd-no-iommu", "gamma": "intel-ready"}


@dataclass
class Fleet:
    daemons: dict[str, Daemon]
    envs: dict[str, DaemonEnv]
    config: Path
    down_url: str

    def run(self, *argv: str) -> Result:
        return run(*argv, env={"SPK_VISOR_CONFIG": str(self.config)})


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    envs = {name: DaemonEnv(tmp_path / name, kind=KINDS[name]) for name in NAMES}
    daemons: dict[str, Daemon] = {}
    try:
        for name in NAMES:
            daemons[name] = Daemon(envs[name])
        # gamma is in the group but its daemon is not running: its port is closed.
        down_url = daemons["gamma"].url
        daemons["gamma"].stop()
        config = tmp_path / "config.toml"
        nodes = "".join(
            f'[nodes.{name}]\nurl = "{daemons[name].url}"\n'
            f'token_file = "{envs[name].token_file}"\n\n'
            for name in NAMES
        )
        config.write_text(
            nodes + '[groups]\nrack = ["alpha", "beta", "gamma"]\nup = ["alpha", "beta"]\n'
            'ready = ["alpha"]\n'
        )
        yield Fleet(daemons, envs, config, down_url)
    finally:
        for name, d in daemons.items():
            d.stop()
            kill_vmms(envs[name].run_dir)
            envs[name].cleanup()


def rows(out: str) -> list[list[str]]:
    """The table's cells, split on the two-space column gaps."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]


def refused_row(fleet: Fleet, row: list[str]) -> None:
    assert row[0] == "gamma"
    assert row[1] == f"error: connection refused at {fleet.down_url}"


def test_fleet_node(fleet: Fleet) -> None:
    r = fleet.run("--fleet", "rack", "node")
    assert r.code == 7  # the first failure's exit code: gamma is unreachable
    header, *body = rows(r.out)
    assert header[:2] == ["NODE", "STATUS"]
    assert [row[0] for row in body] == ["alpha", "beta", "gamma"]  # the group's order
    assert body[0][1] == "ok" and body[0][2].startswith("Intel(R) Xeon(R) Silver 4309Y")
    assert body[1][1] == "ok" and body[1][2] == "AMD Threadripper PRO 9965WX"
    refused_row(fleet, body[2])

    assert fleet.run("--fleet", "ready", "node").code == 0


def test_fleet_node_json(fleet: Fleet) -> None:
    r = fleet.run("--json", "--fleet", "rack", "node")
    assert r.code == 7
    doc = json.loads(r.out)
    assert list(doc) == ["alpha", "beta", "gamma"]
    assert doc["alpha"]["hostname"] == "smech-01"
    assert doc["beta"]["hostname"] == "smech-tr"
    assert doc["gamma"] == {
        "error": {
            "message": f"connection refused at {fleet.down_url}",
            "hint": "is the service running? rc-service smechvisord status",
            "exit_code": 7,
            "reason": "transient",
        }
    }


def test_one_node_and_a_fleet_report_a_failure_in_one_shape(fleet: Fleet) -> None:
    """--json: a failed single-node command prints on stdout the document a fleet shows
    for that node (and the message on stderr too, for people and cron mail)."""
    fleet_doc = json.loads(fleet.run("--json", "--fleet", "rack", "node").out)["gamma"]

    r = fleet.run("--json", "--node", fleet.down_url, "--token", "x" * 16, "node")

    assert r.code == 7
    assert json.loads(r.out) == fleet_doc
    assert r.err_lines[0] == f"spk-visor: error: connection refused at {fleet.down_url}"
    # The command's own --json counts as much as the global one.
    r = fleet.run("--node", "gamma", "vm", "list", "--json")
    assert r.code == 7
    assert json.loads(r.out) == fleet_doc


def test_fleet_vm_list(fleet: Fleet) -> None:
    create_vm(fleet.daemons["alpha"], fleet.envs["alpha"], name="web-1")
    r = fleet.run("--fleet", "rack", "vm", "list")
    assert r.code == 7
    header, *body = rows(r.out)
    assert header == ["NODE", "STATUS", "ID", "STATE", "PID", "CPUS", "MEMORY", "CPU%", "DISK"]
    web = [row for row in body if row[0] == "alpha" and row[2] == "web-1"]
    assert len(web) == 1 and web[0][1] == "ok" and web[0][3] == "running"
    # beta answered (alpha's VMM shows there as unmanaged: VMMs are host-wide here).
    beta = [row for row in body if row[0] == "beta"]
    assert beta and all(row[1].startswith("ok") for row in beta)
    assert all(row[2].endswith("(unmanaged)") for row in beta if len(row) > 2)
    gamma = [row for row in body if row[0] == "gamma"]
    assert len(gamma) == 1
    refused_row(fleet, gamma[0])

    r = fleet.run("--json", "--fleet", "rack", "vm", "list")
    doc = json.loads(r.out)
    assert list(doc) == ["alpha", "beta", "gamma"]
    assert [vm["id"] for vm in doc["alpha"] if vm["managed"]] == ["web-1"]
    assert isinstance(doc["beta"], list)
    assert doc["gamma"]["error"]["exit_code"] == 7


def test_fleet_vm_list_node_without_vms(fleet: Fleet) -> None:
    r = fleet.run("--fleet", "ready", "vm", "list")
    assert r.code == 0
    body = rows(r.out)[1:]
    # Every node of the group shows up, even with nothing to list. (VMMs other tests left
    # running on this machine would show as unmanaged rows instead.)
    if all(len(row) == 2 for row in body):
        assert body == [["alpha", "ok (no VMs)"]]
    else:
        assert all(row[0] == "alpha" and row[2].endswith("(unmanaged)") for row in body)


def test_fleet_iommu(fleet: Fleet) -> None:
    r = fleet.run("--fleet", "rack", "iommu")
    assert r.code == 7
    header, *body = rows(r.out)
    assert header == ["NODE", "STATUS", "READY", "BLOCKERS"]
    assert body[0] == ["alpha", "ok", "yes", "none"]  # absent values in words
    assert body[1] == [
        "beta",
        "ok",
        "no",
        "IOMMU groups are empty: enable VT-d / AMD-Vi in firmware setup",
    ]
    refused_row(fleet, body[2])

    # Every node answered, but one is not ready: exit 3, as for one node.
    assert fleet.run("--fleet", "up", "iommu").code == 3
    assert fleet.run("--fleet", "ready", "iommu").code == 0

    doc = json.loads(fleet.run("--json", "--fleet", "rack", "iommu").out)
    assert doc["alpha"]["ready"] is True and doc["beta"]["ready"] is False
    assert "error" in doc["gamma"]


def test_fleet_pci(fleet: Fleet) -> None:
    r = fleet.run("--fleet", "rack", "pci")
    assert r.code == 7
    header, *body = rows(r.out)
    assert header == ["NODE", "STATUS", "DEVICES", "VIABLE", "ON VFIO-PCI", "HOST-CRITICAL"]
    assert [row[0] for row in body] == ["alpha", "beta", "gamma"]
    alpha = body[0]
    assert alpha[1] == "ok" and int(alpha[2]) == 10 and int(alpha[3]) == 4
    assert "0000:3b:00.0 (carries the root filesystem)" in alpha[5]
    refused_row(fleet, body[2])

    doc = json.loads(fleet.run("--json", "--fleet", "rack", "pci").out)
    assert len(doc["alpha"]) == 10
    assert "error" in doc["gamma"]


def test_fleet_refused_for_single_node_commands(fleet: Fleet) -> None:
    r = fleet.run("--fleet", "rack", "vm", "show", "web-1")
    assert r.code == 2
    assert r.err_lines == ["spk-visor: error: --fleet is not supported by this command; use --node"]


@pytest.fixture
def hung_nodes(tmp_path: Path) -> Iterator[Path]:
    """A config whose group of 24 nodes all accept a connection and never answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    names = [f"n{i:02d}" for i in range(24)]
    config = tmp_path / "config.toml"
    config.write_text(
        "".join(f'[nodes.{n}]\nurl = "{url}"\n\n' for n in names)
        + f"[groups]\nhung = {json.dumps(names)}\n"
    )
    try:
        yield config
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def test_ctrl_c_stops_a_fleet_query_at_once(hung_nodes: Path) -> None:
    """24 nodes, 16 at a time, 8 s each: finishing the run would take 16 s. Ctrl-C must
    end it now, with 130, not after every queued node has timed out in turn."""
    argv = ["--fleet", "hung", "--token", "t" * 16, "--timeout", "8", "node"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spk_visor", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SPK_VISOR_CONFIG": str(hung_nodes)},
        cwd=ROOT,
    )
    try:
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "Traceback" not in err
    assert took < 6, took  # well under the 8 s --timeout the hung nodes would need


@pytest.mark.parametrize("argv", [["vm", "list"], ["node"], ["iommu"], ["pci"]])
def test_a_failed_nodes_row_says_its_values_are_unknown(tmp_path: Path, argv: list[str]) -> None:
    """A node that did not answer had blank cells after its status: the table says, in
    words, that its values are not known (as absent values are said elsewhere)."""
    with socket.socket() as closed:  # a port nothing listens on: refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        config = tmp_path / "config.toml"
        config.write_text(
            f'[nodes.down]\nurl = "http://127.0.0.1:{port}"\n[groups]\nrack = ["down"]\n'
        )
        r = run("--fleet", "rack", "--token", "t" * 16, *argv,
                env={"SPK_VISOR_CONFIG": str(config)})  # fmt: skip
    assert r.code == 7, r
    header, row = r.out.splitlines()[:2]
    columns = len(header.split()) - 2 - header.count("ON VFIO-PCI")  # node, status
    assert row.startswith("down") and "error:" in row, row
    assert row.split()[-columns:] == ["unknown"] * columns, r.out
