"""The node side end to end, as an operator or a push runs it: `spk-visor ota apply` of a
signed bundle (file and stdin), the detached worker, the live swap under real OpenRC,
automatic rollback, status, history and verify-installed. Root and OpenRC."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.config import SshSpec
from spk_visor.ota import build
from spk_visor.ota.push import PushTarget, overall_exit, push
from spk_visor.transport import ssh
from tests.integration.test_ota_swap import reaper  # noqa: F401 (module fixture)
from tests.support.ota_pki import Pki
from tests.support.ota_release import PACKAGE, OtaNode, make_daemon_tree
from tests.support.sshd import start_sshd

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture
def node(tmp_path: Path, reaper: None, pki: Pki) -> Iterator[OtaNode]:  # noqa: F811
    n = OtaNode(tmp_path)
    n.install()
    factory = n.paths.factory_root
    factory.parent.mkdir(parents=True, exist_ok=True)
    factory.write_bytes(pki.root_env().to_bytes())
    try:
        yield n
    finally:
        n.remove()


def bundle(node: OtaNode, pki: Pki, version: str, counter: int, **tree: Any) -> Path:
    src = make_daemon_tree(node.root / "trees" / f"{version}-{counter}", version, **tree)
    out = node.root / f"spk-{version}.spkb"
    # An unhealthy tree may say another version on purpose: the node must roll it back.
    build.build(out=out, version=version, counter=counter, keys=pki.release, daemon_tree=src,
                probation_s=2, check_tree=tree.get("healthy", True))  # fmt: skip
    return out


def spk(
    node: OtaNode, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "spk_visor", *args],
        cwd=PACKAGE.parent,
        env={**node.env(), "SPK_VISOR_CONFIG": "/nonexistent"},
        input=stdin,
        capture_output=True,
        timeout=180,
        check=False,
    )


def health_version(node: OtaNode) -> str | None:
    doc = node.health()
    return None if doc is None else str(doc.get("version"))


def status(node: OtaNode) -> dict[str, Any]:
    res = spk(node, "ota", "status", "--json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_apply_swap_commit_then_rollback(node: OtaNode, pki: Pki) -> None:
    v1 = bundle(node, pki, "1.0.0", 10)
    res = spk(node, "ota", "apply", "--bundle", str(v1))
    assert res.returncode == 0, res.stderr.decode()
    assert health_version(node) == "1.0.0"

    # v2 from stdin, as a push streams it, with NDJSON events.
    v2 = bundle(node, pki, "2.0.0", 20)
    res = spk(node, "ota", "apply", "--bundle", "-", "--json", stdin=v2.read_bytes())
    assert res.returncode == 0, res.stderr.decode()
    events = [json.loads(line) for line in res.stdout.decode().splitlines()]
    assert events[-1]["event"] == "result" and events[-1]["exit_code"] == 0
    assert any(e["event"] == "progress" and e["phase"] == "verify" for e in events)
    phases = [
        e.get("phase") for e in events if e["event"] == "phase" and e.get("component") == "daemon"
    ]
    assert phases[-1] == "committed", phases
    assert health_version(node) == "2.0.0"
    st = status(node)
    assert st["daemon"]["phase"] == "committed" and 0 < st["daemon"]["downtime_ms"] < 3000
    assert st["installed"]["version"] == "2.0.0" and st["counter_floor"] == 0
    assert st["current"].startswith("releases/2.0.0-") or "2.0.0" in st["current"]

    # Same bundle again: nothing to do; 77 when asked.
    res = spk(node, "ota", "apply", "--bundle", str(v2), "--unchanged-exit-77")
    assert res.returncode == 77, res.stderr.decode()

    # A release whose health fails is rolled back: exit 5, the old version answers.
    v3 = bundle(node, pki, "3.0.0", 30, healthy=False, failure="wrong_version")
    res = spk(node, "ota", "apply", "--bundle", str(v3))
    assert res.returncode == 5, res.stderr.decode()
    assert health_version(node) == "2.0.0"
    assert status(node)["daemon"]["phase"] == "rolled_back"

    # An older release is refused in push mode without --allow-downgrade (nothing changes).
    res = spk(node, "ota", "apply", "--bundle", str(v1))
    assert res.returncode == 3 and b"--allow-downgrade" in res.stderr

    res = spk(node, "ota", "verify-installed", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ok"] is True, res.stdout
    history = json.loads(spk(node, "ota", "history", "--json").stdout)
    assert [e for e in history if e["event"] == "verified"], history


def test_detached_apply_then_status_wait(node: OtaNode, pki: Pki) -> None:
    v1 = bundle(node, pki, "1.0.0", 10)
    assert spk(node, "ota", "apply", "--bundle", str(v1)).returncode == 0
    v2 = bundle(node, pki, "2.0.0", 20)
    started = time.monotonic()
    res = spk(node, "ota", "apply", "--bundle", str(v2), "--detach", "--json")
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout.decode().splitlines()[-1])["detached"] is True
    # A second update while the worker holds the lock: busy.
    busy = spk(node, "ota", "apply", "--bundle", str(v2))
    assert busy.returncode in (0, 6), busy.stderr.decode()
    res = spk(node, "ota", "status", "--wait", "--json")
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout)["daemon"]["phase"] == "committed"
    assert health_version(node) == "2.0.0"
    assert time.monotonic() - started < 120


# ---- push: the workstation streams over real sshd into the real `ota apply` ----------


@pytest.fixture
def fleet(tmp_path: Path, reaper: None, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:  # noqa: F811
    """Two nodes, each its own sshd and OpenRC service; ~/.ssh names them node0 and node1.

    Both sshd run on this machine, so the node's `spk-visor` is a wrapper that picks the
    node's sysroot by the server port the login came in on (SSH_CONNECTION).
    """

    nodes: list[OtaNode] = []
    servers = []
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    wrapper = tmp_path / "node-spk-visor"
    by_port = tmp_path / "by-port"
    by_port.mkdir()
    wrapper.write_text(
        "#!/bin/sh\n"
        'port=$(echo "$SSH_CONNECTION" | cut -d" " -f4)\n'
        f'SPK_VISOR_OTA_SYSROOT=$(cat "{by_port}/$port")\n'
        "export SPK_VISOR_OTA_SYSROOT\n"
        f'cd "{PACKAGE.parent}" && exec "{sys.executable}" -m spk_visor "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    try:
        config, known = [], []
        for i in range(2):
            n = OtaNode(tmp_path / f"node{i}")
            n.install()
            nodes.append(n)
            n.paths.factory_root.parent.mkdir(parents=True, exist_ok=True)
            n.paths.factory_root.write_bytes(pki.root_env().to_bytes())
            server = start_sshd()
            servers.append(server)
            (by_port / str(server.port)).write_text(str(n.sysroot))
            config.append(
                f"Host node{i}\n    HostName 127.0.0.1\n    Port {server.port}\n"
                f"    User root\n    IdentityFile {server.user_key}\n"
            )
            known.append(f"{server.known_hosts_name} {server.host_pub}\n")
        (home / ".ssh" / "config").write_text("".join(config))
        (home / ".ssh" / "known_hosts").write_text("".join(known))
        yield nodes, str(wrapper)
    finally:
        ssh.close_all()
        for server in servers:
            server.stop()
        for n in nodes:
            n.remove()


def test_push_canary_then_rest_and_stop_on_failure(fleet: Any, pki: Pki) -> None:

    nodes, remote = fleet
    first = bundle(nodes[0], pki, "1.0.0", 10)
    for n in nodes:
        assert spk(n, "ota", "apply", "--bundle", str(first)).returncode == 0
    targets = [PushTarget(f"node{i}", SshSpec(f"node{i}")) for i in range(2)]
    v2 = bundle(nodes[0], pki, "2.0.0", 20)
    results = push(v2, targets, parallel=2, canary=True, remote_command=[remote],
                   timeout=30, accept_new=False, follow_timeout=120)  # fmt: skip
    assert [r.exit_code for r in results] == [0, 0], [r.to_doc() for r in results]
    assert all(health_version(n) == "2.0.0" for n in nodes)
    assert all(r.downtime_ms is not None and r.downtime_ms < 3000 for r in results)
    assert results[0].phase == "committed"

    v3 = bundle(nodes[0], pki, "3.0.0", 30, healthy=False, failure="wrong_version")
    before = ota_state(nodes[1])
    results = push(
        v3,
        targets,
        parallel=2,
        canary=True,
        stop_on_failure=True,
        remote_command=[remote],
        timeout=30,
        accept_new=False,
        follow_timeout=120,
    )
    assert results[0].exit_code == 5 and results[1].phase == "skipped", [
        r.to_doc() for r in results
    ]
    assert overall_exit(results) == 5
    assert [health_version(n) for n in nodes] == ["2.0.0", "2.0.0"]
    # node1 was sent v3 while the canary applied it, all but the last byte, and then cut
    # short: the real `ota apply` refused the truncated bundle and kept none of it.
    assert "cut 1 byte short" in results[1].message and "exited 3" in results[1].message
    assert "3.0.0" not in json.dumps(status(nodes[1]))
    assert ota_state(nodes[1]) == before


def ota_state(node: OtaNode) -> dict[str, object]:
    """What an apply may change on a node: every file of its OTA state, store and releases
    (name, size and contents), its history and its current release."""
    files: dict[str, object] = {}
    paths = node.paths
    for top in (paths.state_dir, paths.store, paths.trust_dir, paths.releases):
        for path in sorted(top.rglob("*")) if top.exists() else []:
            if path.is_file() and not path.is_symlink() and path != paths.lock:
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                files[str(path)] = "link" if path.is_symlink() else "dir"
    files["current"] = str(paths.current.resolve())
    return files
