"""`spk-visor ota pull` against a real static repository served on 127.0.0.1.

The repository is published by spk_visor.ota.repo (the code behind `ota publish`) and
served by tests/support/flaky_repo.py, which can misbehave. These tests run the pull in
download-only policy (the daemon swap and the base staging have their own tests), so
every check of the cron path is exercised: root walk, conditional channel GET, serial
and expiry, rollout buckets, the manifest pin, resumable blobs, mirrors, backoff, lock.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spk_visor.errors import ExitCode
from spk_visor.ota import engine, journal, pull
from spk_visor.ota.context import OtaContext, load_context
from spk_visor.ota.repo import Repo, rel_channel
from spk_visor.ota.store import BlobStore
from tests.support import cli
from tests.support.flaky_repo import FlakyRepo, closed_port_url
from tests.support.ota_pki import Node, Pki, make_bundle, make_node, stub_worker

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pki() -> Pki:
    return Pki()


@pytest.fixture
def node(tmp_path: Path, pki: Pki) -> Node:
    return make_node(tmp_path, pki)


def _conf(node: Node, urls: list[str], **extra: object) -> None:
    node.write_pull_conf(urls, **extra)


def _publish(
    tmp_path: Path,
    pki: Pki,
    repo_dir: Path,
    *,
    counter: int = 2,
    percent: float = 100,
    expires: dt.timedelta = dt.timedelta(days=7),
    size: int = 3 << 20,
) -> str:
    tree = tmp_path / f"tree-{repo_dir.name}-{counter}"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "smechvisord").write_bytes(os.urandom(size))
    built = make_bundle(
        tmp_path,
        pki,
        counter=counter,
        version=f"0.{counter}.0",
        tree=tree,
        name=f"{repo_dir.name}-{counter}.spkb",
    )
    r = Repo(repo_dir)
    sha, _m = r.add_bundle(built.bundle)
    r.sign_channel("stable", pki.channel, manifest_sha=sha, expires_in=expires, percent=percent)
    return sha


def _pull(node: Node, *args: str) -> cli.Result:
    return cli.run("ota", "pull", "--json", *args, env=node.env)


def _result(res: cli.Result) -> dict[str, object]:
    lines = [json.loads(x) for x in res.out.splitlines() if x.startswith("{")]
    return lines[-1] if lines else {}


def test_pull_downloads_verifies_then_304(tmp_path: Path, pki: Pki, node: Node) -> None:
    repo_dir = tmp_path / "repo"
    sha = _publish(tmp_path, pki, repo_dir)
    with FlakyRepo(repo_dir) as server:
        _conf(node, [server.url])
        res = _pull(node)
        assert res.code == 0, res.err
        doc = _result(res)
        assert doc["reason"] == "download only (policy)" and doc["manifest"] == sha
        m = Repo(repo_dir).load_manifest(sha)
        assert all(BlobStore(node.paths).has(b, s) for b, s in m.blobs.items())
        history = cli.run("ota", "history", "--json", env=node.env)
        events = [e["event"] for e in json.loads(history.out)]
        assert "verified" in events
        # Second run: one conditional GET of the channel, answered 304.
        before = len(server.requests)
        res = _pull(node, "--unchanged-exit-77")
        assert res.code == 77, res.err
        channel_reqs = [s for s in server.requests[before:] if s.rel == rel_channel("stable")]
        assert channel_reqs and "if-none-match" in channel_reqs[0].headers
        assert all(not s.rel.startswith("blobs/") for s in server.requests[before:])


def test_pull_survives_500s_and_truncation(tmp_path: Path, pki: Pki, node: Node) -> None:
    repo_dir = tmp_path / "repo"
    sha = _publish(tmp_path, pki, repo_dir)
    blob = next(iter(Repo(repo_dir).load_manifest(sha).blobs))
    blob_rel = f"blobs/sha256/{blob.split(':')[1]}"
    with FlakyRepo(repo_dir) as server:
        _conf(node, [server.url], fetch_attempts=4)
        server.fail_500(1, rel=rel_channel("stable"))
        server.truncate(1, rel=blob_rel)
        res = _pull(node)
        assert res.code == 0, res.err
        ranged = [s for s in server.requests if s.rel == blob_rel and s.range_start]
        assert ranged, "the truncated blob was not resumed with a Range request"
        assert BlobStore(node.paths).has(blob, Repo(repo_dir).load_manifest(sha).blobs[blob])


def test_mirror_order_and_all_down_backoff(tmp_path: Path, pki: Pki, node: Node) -> None:
    repo_dir = tmp_path / "repo"
    _publish(tmp_path, pki, repo_dir)
    with FlakyRepo(repo_dir) as server:
        _conf(node, [closed_port_url(), server.url])
        assert _pull(node).code == 0
    # Every mirror down: exit 7, and the next unattended run backs off without a request.
    node2 = make_node(tmp_path / "n2", pki)
    _conf(node2, [closed_port_url()])
    res = _pull(node2)
    assert res.code == 7 and "127.0.0.1" in res.err, res.err
    res = _pull(node2)
    assert res.code == 7 and "backing off" in res.err, res.err


def test_expired_channel_and_replayed_serial(tmp_path: Path, pki: Pki, node: Node) -> None:
    repo_dir = tmp_path / "repo"
    _publish(tmp_path, pki, repo_dir, expires=dt.timedelta(seconds=-60))
    with FlakyRepo(repo_dir) as server:
        _conf(node, [server.url])
        res = _pull(node)
        assert res.code == 3 and "expired" in res.err, res.err
        # Nothing is believed from an expired channel: its serial is not recorded.
        assert not node.paths.floor.exists()
    # Serial 2 seen, then a stale edge serves serial 1 again: exit 7, nothing changes.
    repo2 = tmp_path / "repo2"
    _publish(tmp_path, pki, repo2)
    old_channel = (repo2 / "v1" / rel_channel("stable")).read_bytes()
    Repo(repo2).sign_channel(
        "stable", pki.channel, manifest_sha=None, expires_in=dt.timedelta(days=7)
    )
    node2 = make_node(tmp_path / "n2", pki)
    with FlakyRepo(repo2) as server:
        _conf(node2, [server.url])
        assert _pull(node2).code == 0
        (repo2 / "v1" / rel_channel("stable")).write_bytes(old_channel)
        before = node2.tree_digest(skip=("run/lock", "var/lib/spk-visor/ota/pull.json"))
        res = _pull(node2)
        assert res.code == 7 and "older than 2" in res.err, res.err
        assert node2.tree_digest(skip=("run/lock", "var/lib/spk-visor/ota/pull.json")) == before


def test_manifest_not_matching_channel_pin(tmp_path: Path, pki: Pki, node: Node) -> None:
    repo_dir = tmp_path / "repo"
    sha = _publish(tmp_path, pki, repo_dir)
    other = _publish(tmp_path, pki, tmp_path / "other", counter=3)
    # The mirror serves another (validly signed) manifest under the pinned name.
    (repo_dir / "v1" / "manifests" / f"{sha}.json").write_bytes(
        (tmp_path / "other" / "v1" / "manifests" / f"{other}.json").read_bytes()
    )
    with FlakyRepo(repo_dir) as server:
        _conf(node, [server.url])
        res = _pull(node)
        assert res.code == 3 and "does not match the hash its channel points to" in res.err


def test_rollout_buckets(tmp_path: Path, pki: Pki, node: Node) -> None:
    ids = [f"node-{i}" for i in range(20000)]
    share = sum(pull.eligible(n, "salt-a", 25) for n in ids) / len(ids)
    assert 0.23 < share < 0.27
    assert [pull.bucket(n, "salt-a") for n in ids[:50]] == [
        pull.bucket(n, "salt-a") for n in ids[:50]
    ]
    # Widening keeps everyone who was in: buckets are fixed, only the cut moves.
    assert all(pull.eligible(n, "s", 50) for n in ids if pull.eligible(n, "s", 10))
    repo_dir = tmp_path / "repo"
    _publish(tmp_path, pki, repo_dir, percent=0)
    with FlakyRepo(repo_dir) as server:
        _conf(node, [server.url])
        res = _pull(node)
        assert res.code == 8 and "outside the rollout" in res.err, res.err


def test_parallel_pulls_exactly_one_proceeds(tmp_path: Path, pki: Pki, node: Node) -> None:
    repo_dir = tmp_path / "repo"
    sha = _publish(tmp_path, pki, repo_dir, size=2 << 20)
    blob = next(iter(Repo(repo_dir).load_manifest(sha).blobs))
    with FlakyRepo(repo_dir) as server:
        _conf(node, [server.url])
        # The winner downloads slowly, so the others find the lock held.
        server.slow_drip(1 << 20, n=1, rel=f"blobs/sha256/{blob.split(':')[1]}")
        env = {**os.environ, **node.env, "SPK_VISOR_CONFIG": "/nonexistent"}
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "spk_visor", "ota", "pull", "-q"],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(4)
        ]
        codes = []
        deadline = time.monotonic() + 60
        for p in procs:
            p.wait(timeout=max(1, deadline - time.monotonic()))
            codes.append(p.returncode)
        assert sorted(codes) == [0, 6, 6, 6], codes


def test_pull_that_starts_the_worker_follows_it(
    tmp_path: Path, pki: Pki, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull whose policy applies the daemon hands off to the worker and follows it.

    The worker itself (the OpenRC swap) has its own root-only tests; here it is replaced,
    so what is checked is the hand-off: run() used to return the worker's 3-tuple, which
    the CLI could not unpack (exit 1 while the worker went on in the background).
    """
    repo_dir = tmp_path / "repo"
    sha = _publish(tmp_path, pki, repo_dir, size=64 << 10)
    started: list[tuple[str, bool, bool]] = []
    followed: list[str | None] = []

    def fake_start(
        ctx: OtaContext, plan: engine.Plan, opts: engine.ApplyOptions, lock_fd: int
    ) -> subprocess.Popen[bytes]:
        # The lock is still held while the worker starts, and passed on to it.
        assert journal.lock_holder(ctx.paths) is not None
        started.append((plan.manifest_sha256, opts.apply_daemon, opts.stage_base))
        return subprocess.Popen([sys.executable, "-c", ""])

    def fake_follow(
        ctx: OtaContext,
        proc: subprocess.Popen[bytes] | None = None,
        manifest_hex: str | None = None,
    ) -> ExitCode:
        assert proc is not None
        proc.wait(timeout=30)
        # The foreground follows with the lock released (the worker holds its own copy).
        assert journal.lock_holder(ctx.paths) is None
        followed.append(manifest_hex)
        return ExitCode.ROLLED_BACK

    monkeypatch.setattr(engine, "start_worker", fake_start)
    monkeypatch.setattr(engine, "follow", fake_follow)
    for key, value in node.env.items():
        monkeypatch.setenv(key, value)
    with FlakyRepo(repo_dir) as server:
        _conf(node, [server.url], apply_daemon=True)
        code, doc = pull.run(load_context(), pull.PullOptions(interactive=True))
    assert started == [(sha, True, False)]
    assert followed == [sha]
    assert code == ExitCode.ROLLED_BACK
    assert doc["changed"] is True and doc["manifest"] == sha and doc["daemon"] == "swap"


def test_not_modified_channel_still_applies_what_waits(
    tmp_path: Path, pki: Pki, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Download only first; then a run allowed to apply, with the channel answering 304,
    must still start the worker (a 304 re-checks the stored channel, it does not end the
    run), and without fetching the manifest or blobs again."""
    repo_dir = tmp_path / "repo"
    sha = _publish(tmp_path, pki, repo_dir, size=64 << 10)
    started: list[str] = []

    stub_worker(monkeypatch, started)
    for key, value in node.env.items():
        monkeypatch.setenv(key, value)
    with FlakyRepo(repo_dir) as server:
        _conf(node, [server.url])
        code, doc = pull.run(load_context(), pull.PullOptions(interactive=True))
        assert code == ExitCode.OK and doc["changed"] is False and started == []
        before = len(server.requests)
        code, doc = pull.run(load_context(), pull.PullOptions(interactive=True, apply_daemon=True))
        assert started == [sha] and code == ExitCode.OK and doc["changed"] is True
        later = server.requests[before:]
        assert [s.status for s in later if s.rel == rel_channel("stable")] == [304]
        assert not [s for s in later if s.rel.startswith(("manifests/", "blobs/"))]


def test_jitter_sleeps_without_the_lock(
    tmp_path: Path, pki: Pki, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cron pull's jitter (up to 15 minutes on an image node) is spent before it takes
    the OTA lock: an admin's `ota push` meanwhile is not refused as busy (exit 6). The
    pull itself still takes the lock for its work: it never overlaps an apply."""
    repo_dir = tmp_path / "repo"
    _publish(tmp_path, pki, repo_dir, size=64 << 10)
    holders: list[str | None] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        holders.append(journal.lock_holder(node.paths))
        # What a push's apply does while the pull waits: it gets the lock.
        with journal.locked(node.paths, "apply"):
            real_sleep(0)

    monkeypatch.setattr(time, "sleep", sleep)
    for key, value in node.env.items():
        monkeypatch.setenv(key, value)
    with FlakyRepo(repo_dir) as server:
        _conf(node, [server.url])
        code, _doc = pull.run(load_context(), pull.PullOptions(jitter=900, interactive=False))
        assert code == ExitCode.OK
        assert holders == [None]
        # An apply holding the lock when the pull wakes up: the pull is busy (exit 6).
        monkeypatch.setattr(time, "sleep", lambda _s: None)
        with journal.locked(node.paths, "apply"), pytest.raises(Exception) as busy:
            pull.run(load_context(), pull.PullOptions(jitter=900, interactive=False))
        assert getattr(busy.value, "exit_code", None) == ExitCode.BUSY
