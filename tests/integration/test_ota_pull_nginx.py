"""`ota pull` against nginx serving the repository with the configuration docs/ota-origin.md
gives users: the caching headers, a 304 for an unchanged channel, a Range resume after a
cut, and failover when the first origin is down. The misbehaving origin of
test_ota_pull.py covers the faults nginx will not produce on demand."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from spk_visor.ota.repo import Repo, rel_blob, rel_channel
from spk_visor.ota.store import BlobStore
from tests.support import cli
from tests.support.flaky_repo import closed_port_url
from tests.support.nginx import Hit, Nginx
from tests.support.ota_pki import Node, Pki, make_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pki(ota_pki: Pki) -> Pki:
    return ota_pki


@pytest.fixture
def node(ota_node: Node) -> Node:
    return ota_node


def _conf(node: Node, urls: list[str], **extra: object) -> None:
    node.write_pull_conf(urls, **extra)


def _publish(tmp_path: Path, pki: Pki, repo_dir: Path, size: int) -> str:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    launcher = tree / "bin" / "smechvisord"
    launcher.write_bytes(b"#!/bin/sh\n#" + os.urandom(size))
    launcher.chmod(0o755)
    (tree / "lib").mkdir()
    (tree / "lib" / "VERSION").write_text("0.2.0\n")
    built = make_bundle(tmp_path, pki, counter=2, version="0.2.0", tree=tree, name="r.spkb")
    repo = Repo(repo_dir)
    sha, _m = repo.add_bundle(built.bundle)
    repo.sign_channel("stable", pki.channel, manifest_sha=sha, expires_in=dt.timedelta(days=7))
    return sha


def _pull(node: Node, *args: str) -> cli.Result:
    return cli.run("ota", "pull", "--json", *args, env=node.env)


def _since(hits: list[Hit], before: int) -> list[Hit]:
    return hits[before:]


def test_caching_headers_follow_the_docs(tmp_path: Path, pki: Pki) -> None:
    repo_dir = tmp_path / "repo"
    sha = _publish(tmp_path, pki, repo_dir, 1 << 10)
    blob = next(iter(Repo(repo_dir).load_manifest(sha).blobs))
    with Nginx(repo_dir, tmp_path / "nginx") as origin:
        base = f"{origin.url}/v1/"
        channel = requests.get(base + rel_channel("stable"), timeout=10)
        assert channel.status_code == 200
        assert channel.headers["Cache-Control"] == "no-cache"
        assert channel.headers["ETag"].startswith('"')  # strong: usable for If-Range
        again = requests.get(
            base + rel_channel("stable"),
            headers={"If-None-Match": channel.headers["ETag"]},
            timeout=10,
        )
        assert again.status_code == 304 and again.content == b""
        b = requests.get(base + rel_blob(blob), headers={"Range": "bytes=10-19"}, timeout=10)
        assert b.status_code == 206 and len(b.content) == 10
        assert "immutable" in b.headers["Cache-Control"]
        probe = requests.get(base + "root/2.root.json", timeout=10)
        assert probe.status_code == 404 and len(probe.content) < 64
        assert probe.headers["Cache-Control"] == "public, max-age=60"
        # Nothing outside v1/ is served.
        assert requests.get(origin.url + "/", timeout=10).status_code == 404


def test_no_change_pull_costs_two_small_requests(tmp_path: Path, pki: Pki, node: Node) -> None:
    repo_dir = tmp_path / "repo"
    sha = _publish(tmp_path, pki, repo_dir, 256 << 10)
    manifest = Repo(repo_dir).load_manifest(sha)
    with Nginx(repo_dir, tmp_path / "nginx") as origin:
        _conf(node, [origin.url])
        first = _pull(node)
        assert first.code == 0, first.err
        assert all(BlobStore(node.paths).has(b, s) for b, s in manifest.blobs.items())
        hits = origin.hits()
        blob_hits = [h for h in hits if "/blobs/" in h.path]
        # Each blob exactly once.
        assert sorted(h.path for h in blob_hits) == sorted(
            f"/v1/{rel_blob(b)}" for b in manifest.blobs
        )
        before = len(hits)
        second = _pull(node, "--unchanged-exit-77")
        assert second.code == 77, second.err
        run = _since(origin.hits(), before)
        assert [h.status for h in run] == [404, 304], run  # the root probe, the channel
        assert sum(h.sent for h in run) <= 1024, run


def test_mirror_failover_when_the_first_origin_is_down(
    tmp_path: Path, pki: Pki, node: Node
) -> None:
    repo_dir = tmp_path / "repo"
    sha = _publish(tmp_path, pki, repo_dir, 64 << 10)
    with Nginx(repo_dir, tmp_path / "nginx") as origin:
        _conf(node, [closed_port_url(), origin.url])
        res = _pull(node)
        assert res.code == 0, res.err
        served = {h.path for h in origin.hits() if h.status == 200}
        assert f"/v1/{rel_channel('stable')}" in served
        assert all(f"/v1/{rel_blob(b)}" in served for b in Repo(repo_dir).load_manifest(sha).blobs)


def test_range_resume_after_a_cut(tmp_path: Path, pki: Pki, node: Node) -> None:
    """A pull killed mid-blob; the next one asks nginx for the rest with Range, starting
    exactly where the node's durable record of the partial file ends."""
    repo_dir = tmp_path / "repo"
    sha = _publish(tmp_path, pki, repo_dir, 24 << 20)
    manifest = Repo(repo_dir).load_manifest(sha)
    big = max(manifest.blobs, key=lambda b: manifest.blobs[b])
    big_path = f"/v1/{rel_blob(big)}"
    store = BlobStore(node.paths)
    meta = store.partial(big).with_suffix(".meta")
    # The cut needs time to happen in: this origin sends blobs at 4 MiB/s.
    with Nginx(repo_dir, tmp_path / "nginx", blob_rate="4m") as origin:
        _conf(node, [origin.url], fetch_timeout_s=30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "spk_visor", "ota", "pull", "--json"],
            env={**os.environ, **node.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                if meta.exists() and json.loads(meta.read_bytes() or b"{}").get("offset", 0) > 0:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the download never recorded any progress")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        held = json.loads(meta.read_bytes())["offset"]
        assert 0 < held < manifest.blobs[big]
        res = _pull(node)
        assert res.code == 0, res.err
        assert store.has(big, manifest.blobs[big])
        tries = [h for h in origin.hits() if h.path == big_path]
        assert len(tries) == 2, tries
        resumed = tries[1]
        assert resumed.status == 206, resumed
        assert resumed.range == f"bytes={held}-", resumed
        # The rest and its headers, nothing it held already.
        assert resumed.sent - (manifest.blobs[big] - held) < 1024, resumed
