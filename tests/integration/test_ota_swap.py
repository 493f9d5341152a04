"""The daemon live swap through the real OpenRC (root): commit, rollback, and a crash shared.

Each node is a temp OTA sysroot plus the shipped smechvisord init script installed as
/etc/init.d/spkota-<uuid8>, whose daemon is <sysroot>/opt/smechvisord/current/bin/smechvisord
(tests/support/ota_release.py). Releases are built from this checkout's smechvisord with
the version overridden; unhealthy ones report a wrong version, exit at once, or die after
two health probes. The swap runs in its own process (tests/support/ota_swap_worker.py), so
SPK_VISOR_OTA_CRASH_AT can SIGKILL it at any durable step, as a power cut would.

The test process reaps orphaned supervise-daemon processes at once (prompt_reaper), as a
node's init does; this sandbox's PID 1 leaves them as zombies for ~1.7 s, which
`rc-service stop` would wait out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.errors import ExitCode, VerificationError
from spk_visor.install import tree
from spk_visor.ota import swap
from spk_visor.ota.journal import DAEMON_PHASES, MAX_TRANSITIONS, TERMINAL
from spk_visor.trust.manifest import Manifest
from tests.support.ota_release import OtaNode, Release, prompt_reaper
from tests.support.prereq import need_command, need_root

SOFTLEVEL = Path("/run/openrc/softlevel")
DOWNTIME_BOUND_MS = 3000
pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def reaper() -> Iterator[None]:
    need_root()
    need_command("rc-service", "openrc")
    need_command("supervise-daemon", "openrc")
    if not SOFTLEVEL.exists():
        pytest.skip(f"{SOFTLEVEL} is missing: run scripts/install-sysdeps as root")
    with prompt_reaper():
        yield


@contextlib.contextmanager
def _node(root: Path) -> Iterator[OtaNode]:
    node = OtaNode(root)
    node.install()
    try:
        yield node
    finally:
        node.remove()


@pytest.fixture
def node(tmp_path: Path, reaper: None) -> Iterator[OtaNode]:
    with _node(tmp_path) as n:
        yield n


def wait_version(node: OtaNode, version: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = node.health()
        if health and health.get("version") == version:
            return health
        time.sleep(0.05)
    pytest.fail(f"{node.name} never answered version {version}; log:\n{node.log.read_text()}")


def apply_ok(node: OtaNode, rel: Release, expect: int = 0, **kwargs: Any) -> None:
    result = node.apply(rel, **kwargs)
    assert result.returncode == expect, (
        f"worker exit {result.returncode}, want {expect}\nstdout: {result.stdout}\n"
        f"stderr: {result.stderr}\nlog:\n{node.log.read_text()[-3000:]}"
    )


def journal(node: OtaNode) -> dict[str, Any]:
    return node.ctx().journal.get("daemon")


def current(node: OtaNode) -> str:
    return os.readlink(node.paths.current)


def manifests(*releases: Release) -> dict[str, Manifest]:
    return {r.hex: r.manifest for r in releases}


class Shared:
    """One node for most tests, reset to "v1 committed and running" before each: a fresh
    node would pay for installing v1 through a full swap every time."""

    def __init__(self, node: OtaNode) -> None:
        self.node = node
        self.v1 = node.release("1.0.0", 100)
        self.good = node.release("2.0.0", 200)
        self.bad = node.release("2.0.1", 201, healthy=False, failure="dies")
        self.broken: dict[str, Release] = {}
        apply_ok(node, self.v1)
        wait_version(node, "1.0.0")
        self.saved = {p.name: p.read_bytes() for p in node.paths.state_dir.iterdir() if p.is_file()}

    def failing(self, failure: str) -> Release:
        """A release that fails in the way `failure` names (built once)."""
        if failure not in self.broken:
            self.broken[failure] = self.node.release(
                f"3.0.{len(self.broken)}", 300, healthy=False, failure=failure, set_floor=300
            )
        return self.broken[failure]

    def reset(self) -> OtaNode:
        node = self.node
        for path in node.paths.state_dir.iterdir():
            if path.is_file():
                path.unlink()
        for name, data in self.saved.items():
            (node.paths.state_dir / name).write_bytes(data)
        health = node.health()
        if current(node) != f"releases/{self.v1.release_id}" or not (
            health and health["version"] == "1.0.0"
        ):
            node.rc("stop")
            swap._flip(node.paths.current, self.v1.release_id)
            assert node.rc("start").returncode == 0
            wait_version(node, "1.0.0")
        node.paths.previous.unlink(missing_ok=True)
        for path in node.paths.releases.iterdir():
            if path.name != self.v1.release_id:
                tree.rmtree(path)
        return node


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, reaper: None) -> Iterator[Shared]:
    with _node(tmp_path_factory.mktemp("shared")) as node:
        yield Shared(node)


# ---- the happy path and automatic rollback --------------------------------------------------


def test_healthy_release_commits_with_bounded_downtime(
    node: OtaNode, record_property: Callable[[str, object], None]
) -> None:
    v1 = node.release("1.0.0", 100)
    v2 = node.release("2.0.0", 200, set_floor=150)
    apply_ok(node, v1)  # the first install: nothing to stop
    first_pid = wait_version(node, "1.0.0")["pid"]

    apply_ok(node, v2)
    health = wait_version(node, "2.0.0")
    assert health["pid"] != first_pid
    assert node.rc("status").returncode == 0
    assert current(node) == f"releases/{v2.release_id}"
    assert os.readlink(node.paths.previous) == f"releases/{v1.release_id}"

    entry = journal(node)
    assert entry["phase"] == "committed" and entry["finalized"] is True
    downtime = entry["downtime_ms"]
    record_property("downtime_ms", downtime)
    print(f"\nlive swap downtime: {downtime} ms ({entry['timings']})")
    assert 0 < downtime < DOWNTIME_BOUND_MS
    assert sum(entry["timings"].values()) <= downtime + 5
    events = [e for e in node.ctx().history.read() if e.get("manifest") == v2.hex]
    assert [e["event"] for e in events] == ["daemon_switched", "daemon_committed"]
    assert all(e["downtime_ms"] == downtime for e in events)

    ctx = node.ctx()
    assert ctx.floor.read()["counter_floor"] == 150  # raised at commit, not before
    installed = ctx.installed.read()
    assert installed["daemon"]["release"] == v2.release_id
    assert installed["daemon"]["previous"]["release"] == v1.release_id
    assert installed["counter"] == 200
    # Only current and previous are kept; release trees are read-only.
    releases = sorted(p.name for p in node.paths.releases.iterdir())
    assert releases == sorted([v1.release_id, v2.release_id])
    launcher = node.paths.releases / v2.release_id / "bin" / "smechvisord"
    assert launcher.stat().st_mode & 0o777 == 0o555

    assert swap.verify_installed(ctx, manifests(v1, v2).__getitem__) == []
    # verify-installed sees a changed byte (root ignores the read-only mode).
    version_py = node.paths.releases / v2.release_id / "lib" / "smechvisord" / "version.py"
    version_py.write_text(version_py.read_text() + "# changed\n")
    problems = swap.verify_installed(ctx, manifests(v1, v2).__getitem__)
    assert any("version.py" in p for p in problems), problems


@pytest.mark.parametrize("failure", ["wrong_version", "exit", "dies"])
def test_unhealthy_release_is_rolled_back(shared: Shared, failure: str) -> None:
    node = shared.reset()
    v1, bad = shared.v1, shared.failing(failure)
    apply_ok(node, bad, expect=5)
    health = node.health()
    assert health is not None and health["version"] == "1.0.0"
    assert node.rc("status").returncode == 0
    assert current(node) == f"releases/{v1.release_id}"
    entry = journal(node)
    assert entry["phase"] == "rolled_back", entry
    ctx = node.ctx()
    floor = ctx.floor.read()
    assert floor["bad_manifests"] == [bad.hex]
    assert floor["counter_floor"] == 0  # a failed update never raises the floor
    assert ctx.installed.read()["daemon"]["release"] == v1.release_id
    assert [e["event"] for e in ctx.history.read() if e.get("manifest") == bad.hex][-1] == (
        "daemon_rolled_back"
    )
    # The next swap works from here: the journal is not stuck.
    assert swap.recover(ctx) == []


def test_no_automatic_rollback_past_a_one_way_migration(shared: Shared) -> None:
    node = shared.reset()
    bad = node.release("4.0.0", 400, healthy=False, rollback_safe=False)
    apply_ok(node, bad, expect=9)
    entry = journal(node)
    assert entry["phase"] == "failed" and "not rollback-safe" in entry["reason"]
    assert current(node) == f"releases/{bad.release_id}"
    assert (node.health() or {}).get("version") == "4.0.0+broken"  # left running
    assert node.ctx().floor.read()["bad_manifests"] == []
    assert swap.recover(node.ctx()) == []


def test_failed_preflight_changes_nothing(shared: Shared) -> None:
    node = shared.reset()
    v1, bad = shared.v1, shared.failing("selfcheck")
    pid = wait_version(node, "1.0.0")["pid"]
    apply_ok(node, bad, expect=5)
    assert journal(node)["reason"].startswith("preflight failed")
    assert wait_version(node, "1.0.0")["pid"] == pid  # never stopped
    assert current(node) == f"releases/{v1.release_id}"


def test_self_check_of_a_staged_release(shared: Shared) -> None:
    node = shared.reset()
    v1 = shared.good
    release = swap.stage(node.ctx(), v1.manifest, v1.hex)
    assert v1.manifest.daemon is not None
    assert tree.verify_tree(release, v1.manifest.daemon) == []
    # Staging again reuses the verified tree; nothing else is left behind.
    assert swap.stage(node.ctx(), v1.manifest, v1.hex) == release
    assert sorted(p.name for p in node.paths.releases.iterdir()) == sorted(
        [shared.v1.release_id, v1.release_id]
    )
    env = swap._service_env(node.paths, node.name)
    assert env["SMECHVISORD_BIND"] == node.settings["SMECHVISORD_BIND"]
    assert "SMECHVISORD_BIN" not in env
    out = swap._run_tree_command(release, ("bin/smechvisord", "--self-check"), 20, dict(env))
    assert out is None
    # The self-check creates nothing (it runs beside the live daemon) ...
    state = node.root / "not-created" / "state"
    launcher = [str(release / "bin" / "smechvisord"), "--self-check"]
    env["SMECHVISORD_STATE_DIR"] = str(state)
    ok = subprocess.run(launcher, env=env, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "self-check ok" in ok.stdout, ok.stderr
    assert not state.parent.exists()
    # ... and fails, with the reason, when a directory cannot be used.
    env["SMECHVISORD_STATE_DIR"] = str(launcher[0] + "/state")
    bad = subprocess.run(launcher, env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "is not a directory" in bad.stderr, bad.stderr


def test_manual_commit_then_manual_rollback(shared: Shared) -> None:
    node = shared.reset()
    v1, v2 = shared.v1, shared.good
    apply_ok(node, v2, manual_commit=True)
    wait_version(node, "2.0.0")
    entry = journal(node)
    assert entry["phase"] == "probation" and entry["awaiting_commit"] is True
    # Recovery at the start of the next CLI command leaves a healthy held release alone.
    assert swap.recover(node.ctx()) == []
    # A new update is refused while one is held.
    assert node.apply(v1).returncode == 6

    result = node.worker("commit")
    assert result.returncode == 0, result.stdout + result.stderr
    assert journal(node)["phase"] == "committed"
    assert node.ctx().installed.read()["daemon"]["release"] == v2.release_id

    ctx = node.ctx()
    floor = ctx.floor.read()
    ctx.floor.write({**floor, "counter_floor": 150})
    refused = node.worker("rollback")
    assert refused.returncode == 3 and "below the node's counter floor" in refused.stdout
    ctx.floor.write(floor)

    result = node.worker("rollback")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_version(node, "1.0.0")
    assert current(node) == f"releases/{v1.release_id}"
    assert os.readlink(node.paths.previous) == f"releases/{v2.release_id}"
    assert node.ctx().floor.read()["bad_manifests"] == [v2.hex]
    assert node.ctx().installed.read()["daemon"]["release"] == v1.release_id
    assert swap.recover(node.ctx()) == []


def test_recovery_after_a_reboot_only_flips(shared: Shared) -> None:
    node = shared.reset()
    v1, v2 = shared.v1, shared.good
    assert node.apply(v2, crash_at="daemon:started").returncode == -9
    # The power cut: the service is gone, and the journal was written in another boot.
    assert node.rc("stop").returncode == 0
    state = node.paths.journal
    doc = json.loads(state.read_text())
    doc["daemon"]["boot_id"] = "an-earlier-boot"
    state.write_text(json.dumps(doc))

    result = node.worker("recover")  # as the boot service would, in its own process
    assert result.returncode == 0, result.stdout + result.stderr
    actions = json.loads(result.stdout)["actions"]
    assert f"current -> {v1.release_id}" in actions
    assert not any(a.startswith("restarted") for a in actions), actions
    assert node.rc("status").returncode == 3  # left for OpenRC to start
    assert journal(node)["phase"] == "rolled_back"
    assert node.rc("start").returncode == 0
    wait_version(node, "1.0.0")


# ---- staging and the loop breaker: no service involved ---------------------------------------


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[OtaNode]:
    node = OtaNode(tmp_path)  # never installed as a service
    yield node
    shutil.rmtree(node.run_dir, ignore_errors=True)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_staging_refuses_a_damaged_pack(bare: OtaNode, damage: str) -> None:
    rel = bare.release("1.0.0", 100)
    assert rel.manifest.daemon is not None
    pack = bare.ctx().store.path(rel.manifest.daemon.pack)
    data = bytearray(pack.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    else:
        del data[-1]
    pack.write_bytes(bytes(data))
    with pytest.raises(VerificationError):
        swap.run(bare.ctx(), rel.manifest, rel.hex)
    assert list(bare.paths.releases.iterdir()) == []  # no staging tree left either
    assert journal(bare)["phase"] == "idle" and journal(bare)["error"]
    assert not bare.paths.current.is_symlink()


def test_loop_breaker_stops_a_release_that_keeps_dying(bare: OtaNode) -> None:
    rel = bare.release("1.0.0", 100)
    ctx = bare.ctx()
    ctx.journal.begin("daemon", "staging", manifest=rel.hex)
    # As if recovery had found this update interrupted again and again.
    ctx.journal.set("daemon", "idle", transitions=MAX_TRANSITIONS)
    assert swap.run(ctx, rel.manifest, rel.hex) == ExitCode.OPERATOR_NEEDED
    entry = journal(bare)
    assert entry["phase"] == "failed" and "loop breaker" in entry["reason"]
    assert not bare.paths.releases.exists() or not list(bare.paths.releases.iterdir())
    # Another release starts a fresh count.
    other = bare.release("1.0.1", 101)
    assert swap.stage(ctx, other.manifest, other.hex).is_dir()
    assert journal(bare)["transitions"] == 1


# ---- crash matrix ------------------------------------------------------------------------

EARLY = ["staging", "unpacked", "preflight"]
SWITCH = ["switching", "stopped", "flipped", "started", "probation"]
HEALTHY_POINTS = [*EARLY, *SWITCH, "committed", "finalized"]
UNHEALTHY_POINTS = [
    *EARLY,
    *SWITCH,
    "rolling_back",
    "rollback_stopped",
    "rollback_flipped",
    "rollback_started",
    "rolled_back",
]
CASES = [(p, True) for p in HEALTHY_POINTS] + [(p, False) for p in UNHEALTHY_POINTS]


def tree_hash(node: OtaNode) -> str:
    """Everything recovery could touch: OTA state and the release links and trees."""
    digest = hashlib.sha256()
    for top in (node.paths.state_dir, node.paths.opt):
        for dirpath, dirnames, filenames in sorted(os.walk(top)):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                path = Path(dirpath, name)
                st = path.lstat()
                digest.update(f"{path}:{st.st_mode:o}".encode())
                if path.is_symlink():
                    digest.update(os.readlink(path).encode())
                elif path.is_file():
                    digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize(
    ("step", "healthy"), CASES, ids=[f"{'good' if h else 'bad'}-{p}" for p, h in CASES]
)
def test_crash_at_every_step_then_recover(shared: Shared, step: str, healthy: bool) -> None:
    node = shared.reset()
    rel = shared.good if healthy else shared.bad
    result = node.apply(rel, crash_at=f"daemon:{step}")
    assert result.returncode == -9, (
        f"the crash point daemon:{step} was not reached (exit {result.returncode})\n"
        f"{result.stdout}\n{result.stderr}"
    )
    if step == "unpacked":
        assert list(node.paths.releases.glob(".staging-*")), "no staging tree to clean up"

    ctx = node.ctx()
    actions = swap.recover(ctx)
    # Only a crash after the final journal write leaves nothing to do.
    assert bool(actions) == (step != "rolled_back"), actions
    assert not list(node.paths.releases.glob(".staging-*"))

    entry = journal(node)
    assert entry["phase"] in TERMINAL, entry
    committed = healthy and step in ("committed", "finalized")
    want = rel if committed else shared.v1
    expected_phase = "committed" if committed else "idle" if step in EARLY else "rolled_back"
    assert entry["phase"] == expected_phase, (actions, entry)
    # `current` is what runs, and it is healthy.
    assert current(node) == f"releases/{want.release_id}"
    health = wait_version(node, want.version, timeout=5)
    assert node.rc("status").returncode == 0
    if committed:
        assert ctx.installed.read()["daemon"]["release"] == rel.release_id
        assert entry["finalized"] is True
    elif step not in EARLY:
        assert rel.hex in ctx.floor.read()["bad_manifests"]
        assert ctx.floor.read()["counter_floor"] == 0

    # A second recovery changes nothing at all, and restarts nothing.
    before = tree_hash(node)
    assert swap.recover(node.ctx()) == []
    assert tree_hash(node) == before
    assert (node.health() or {}).get("pid") == health["pid"]


def test_crash_matrix_covers_every_journal_phase_the_worker_writes() -> None:
    written = set(DAEMON_PHASES) - {"idle", "fetching", "failed"}
    assert written <= {p for p, _ in CASES}
