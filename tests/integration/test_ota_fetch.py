"""The pull-side fetcher against a misbehaving local repository (no root needed).

Every fault ends either with the exact bytes in store/blobs or with a typed error, and in
no case with a wrong file in blobs/ or a partial file that is not a prefix of the blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spk_visor.errors import ConfigError, TransportError, VerificationError
from spk_visor.ota.fetch import Fetcher
from spk_visor.ota.nodeconf import NodeConfig, NodePaths
from spk_visor.ota.store import BlobStore
from tests.support.flaky_repo import (
    FlakyRepo,
    blob_rel,
    closed_port_url,
    put,
    put_blob,
    self_signed,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# An odd size, so off-by-one errors at range and chunk boundaries show.
SIZE = 4 * 1024 * 1024 + 12345


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture(scope="module")
def blob_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_repo(root: Path, data: bytes) -> FlakyRepo:
    put_blob(root, data)
    return FlakyRepo(root)


@pytest.fixture
def repo(tmp_path: Path, data: bytes) -> Iterator[FlakyRepo]:
    with make_repo(tmp_path / "repo", data) as r:
        yield r


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(NodePaths(tmp_path / "node"))


def fetcher(*urls: str, **kw: object) -> Fetcher:
    opts: dict[str, object] = {
        "timeout": 5.0,
        "attempts": 3,
        "backoff": 0.01,
        "max_backoff": 0.05,
        "min_rate": 1,
    }
    opts.update(kw)
    return Fetcher(list(urls), **opts)  # type: ignore[arg-type]


def meta_of(store: BlobStore, blob_id: str) -> dict[str, object]:
    raw = store.partial(blob_id).with_suffix(".meta").read_bytes()
    doc: dict[str, object] = json.loads(raw)
    return doc


def assert_consistent(store: BlobStore, blob_id: str, data: bytes) -> None:
    """blobs/ holds only verified files; a partial is a true prefix that .meta vouches for."""
    if store.blobs_dir.is_dir():
        for f in store.blobs_dir.iterdir():
            assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name, f"corrupt blob {f}"
    part = store.partial(blob_id)
    meta = part.with_suffix(".meta")
    if part.exists():
        kept = part.read_bytes()
        assert data.startswith(kept), "partial file is not a prefix of the blob"
        assert meta_of(store, blob_id)["offset"] == len(kept)
    else:
        assert not meta.exists(), "a .meta without its partial file"


def assert_fetched(store: BlobStore, blob_id: str, data: bytes) -> None:
    assert store.path(blob_id).read_bytes() == data
    assert not store.partial(blob_id).exists()
    assert not store.partial(blob_id).with_suffix(".meta").exists()
    assert_consistent(store, blob_id, data)


# -- plain and resumed downloads ----------------------------------------------------------


def test_plain_download_and_store_hit(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    got: list[int] = []
    path = fetcher(repo.url).fetch_blob(blob_id, SIZE, store, progress=got.append)
    assert path == store.path(blob_id)
    assert_fetched(store, blob_id, data)
    assert sum(got) == SIZE
    [req] = repo.seen()
    assert req.path == "/v1/" + blob_rel(blob_id)
    assert "range" not in req.headers and req.status == 200
    assert req.headers["user-agent"].startswith("spk-visor-ota/")
    # Already in the store: no request at all.
    fetcher(repo.url).fetch_blob(blob_id, SIZE, store)
    assert len(repo.seen()) == 1


def test_truncation_resumes_with_range_and_if_range(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    repo.truncate(n=1)
    got: list[int] = []
    fetcher(repo.url).fetch_blob(blob_id, SIZE, store, progress=got.append)
    assert_fetched(store, blob_id, data)
    assert sum(got) == SIZE
    first, second = repo.seen()
    assert first.status == 200 and 0 < first.sent < SIZE
    assert second.range_start == first.sent > 0
    assert second.headers["if-range"] == repo.etag(blob_rel(blob_id))
    assert second.status == 206 and second.sent == SIZE - first.sent
    assert repo.bytes_sent() < 2 * SIZE


def test_ignored_range_restarts_from_zero(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    repo.truncate(n=1)
    repo.ignore_range(n=None)
    got: list[int] = []
    fetcher(repo.url).fetch_blob(blob_id, SIZE, store, progress=got.append)
    assert_fetched(store, blob_id, data)
    first, second = repo.seen()
    assert second.range_start == first.sent > 0
    assert second.status == 200 and second.sent == SIZE
    # Progress only moves forward, also across the restart from byte 0.
    assert sum(got) == SIZE and min(got) > 0


@pytest.mark.parametrize("shift_body", [True, False], ids=["wrong-range", "wrong-header"])
def test_wrong_content_range_discards_partial_and_restarts(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes, shift_body: bool
) -> None:
    repo.truncate(n=1)
    repo.wrong_content_range(n=1, shift_body=shift_body)
    got: list[int] = []
    fetcher(repo.url).fetch_blob(blob_id, SIZE, store, progress=got.append)
    assert_fetched(store, blob_id, data)
    first, second, third = repo.seen()
    assert sum(got) == SIZE and min(got) > 0
    assert second.range_start == first.sent > 0 and second.status == 206
    # The 206 was refused: the next request starts from byte 0 without Range.
    assert third.range_start is None and "if-range" not in third.headers
    assert third.status == 200 and third.sent == SIZE


def test_etag_change_midway_restarts(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    rel = blob_rel(blob_id)
    old = repo.etag(rel)
    repo.truncate(n=1)
    repo.change_etag_midway(rel=rel)
    fetcher(repo.url).fetch_blob(blob_id, SIZE, store)
    assert_fetched(store, blob_id, data)
    first, second = repo.seen()
    assert second.headers["if-range"] == old != repo.etag(rel)
    assert second.range_start == first.sent > 0
    assert second.status == 200 and second.sent == SIZE


def test_500s_retry_with_exponential_backoff(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    pauses: list[float] = []
    repo.fail_500(n=3)
    f = fetcher(repo.url, attempts=4, backoff=0.01, max_backoff=10.0, sleep=pauses.append)
    f.fetch_blob(blob_id, SIZE, store)
    assert_fetched(store, blob_id, data)
    assert [r.status for r in repo.seen()] == [500, 500, 500, 200]
    assert len(pauses) == 3
    for k, pause in enumerate(pauses):
        assert 0.005 * 2**k <= pause <= 0.015 * 2**k  # backoff * 2^k, jitter x0.5..x1.5


def test_too_slow_is_transient_and_resumes(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    repo.slow_drip(rate=64 * 1024, n=1)
    f = fetcher(repo.url, min_rate=512 * 1024, rate_window=0.3)
    t0 = time.monotonic()
    f.fetch_blob(blob_id, SIZE, store)
    assert time.monotonic() - t0 < 5
    assert_fetched(store, blob_id, data)
    first, second = repo.seen()
    assert first.status == 200 and 0 < first.sent < SIZE
    assert second.range_start is not None and second.range_start > 0
    assert second.status == 206


def test_stalled_server_times_out(store: BlobStore, blob_id: str) -> None:
    # Listens (the kernel completes the handshake) but never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="timed out"):
            fetcher(url, timeout=0.3, attempts=1).fetch_blob(blob_id, SIZE, store)
        assert time.monotonic() - t0 < 3


def test_meta_offset_is_the_truth_after_power_cut(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    # Bytes past the recorded offset were never fsynced: they may be garbage.
    store.ensure()
    kept = 1 << 20
    store.partial(blob_id).write_bytes(data[:kept] + b"\0" * (SIZE - kept - 10))
    other = "http://elsewhere.example/v1/" + blob_rel(blob_id)
    meta = {"blob": blob_id, "size": SIZE, "offset": kept, "etag": '"theirs"', "url": other}
    store.partial(blob_id).with_suffix(".meta").write_text(json.dumps(meta))
    repo.truncate(n=1)
    with pytest.raises(TransportError):
        fetcher(repo.url, attempts=1).fetch_blob(blob_id, SIZE, store)
    # The garbage tail is gone; what is kept is a true prefix, and .meta says how long.
    assert_consistent(store, blob_id, data)
    fetcher(repo.url).fetch_blob(blob_id, SIZE, store)
    assert_fetched(store, blob_id, data)
    first, second = repo.seen()
    # Another mirror's ETag means nothing here: Range alone, the hash is the validator.
    assert first.range_start == kept and "if-range" not in first.headers
    assert second.range_start == kept + first.sent
    assert second.headers["if-range"] == repo.etag(blob_rel(blob_id))


def test_weak_etag_is_not_used_for_if_range(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    repo.set_etag(blob_rel(blob_id), 'W/"weak"')
    repo.truncate(n=1)
    fetcher(repo.url).fetch_blob(blob_id, SIZE, store)
    assert_fetched(store, blob_id, data)
    first, second = repo.seen()
    assert second.range_start == first.sent > 0 and "if-range" not in second.headers
    assert second.status == 206


def test_partial_without_meta_is_not_trusted(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    store.ensure()
    store.partial(blob_id).write_bytes(data[:1000])
    fetcher(repo.url).fetch_blob(blob_id, SIZE, store)
    assert_fetched(store, blob_id, data)
    assert repo.seen()[0].range_start is None


def test_bad_resumed_prefix_restarts_from_zero(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    store.ensure()
    kept = 1 << 20
    bad = bytearray(data[:kept])
    bad[12345] ^= 0x01
    store.partial(blob_id).write_bytes(bytes(bad))
    url = f"{repo.url}/v1/{blob_rel(blob_id)}"
    etag = repo.etag(blob_rel(blob_id))
    meta = {"blob": blob_id, "size": SIZE, "offset": kept, "etag": etag, "url": url}
    store.partial(blob_id).with_suffix(".meta").write_text(json.dumps(meta))
    fetcher(repo.url).fetch_blob(blob_id, SIZE, store)
    assert_fetched(store, blob_id, data)
    first, second = repo.seen()
    assert first.range_start == kept and first.headers["if-range"] == etag
    assert second.range_start is None and second.sent == SIZE


# -- wrong objects ------------------------------------------------------------------------


@pytest.mark.parametrize("no_length", [False, True], ids=["content-length", "close-delimited"])
def test_oversize_object_is_never_kept(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes, no_length: bool
) -> None:
    repo.oversize(extra=10, no_length=no_length)
    with pytest.raises(VerificationError) as exc:
        fetcher(repo.url).fetch_blob(blob_id, SIZE, store)
    assert exc.value.exit_code == 3
    assert "signed" in exc.value.message
    assert not store.path(blob_id).exists() and not store.partial(blob_id).exists()
    assert_consistent(store, blob_id, data)
    # A wrong object is a bad mirror, not a transient failure: no retry on it.
    assert len(repo.seen()) == 1


def test_all_mirrors_corrupt_is_verification_error(
    tmp_path: Path, store: BlobStore, blob_id: str, data: bytes
) -> None:
    with make_repo(tmp_path / "a", data) as a, make_repo(tmp_path / "b", data) as b:
        a.corrupt(offset=100)
        b.corrupt(offset=SIZE - 1)
        with pytest.raises(VerificationError, match="sha256 mismatch") as exc:
            fetcher(a.url, b.url).fetch_blob(blob_id, SIZE, store)
        assert a.url in exc.value.message and b.url in exc.value.message
        assert len(a.seen()) == len(b.seen()) == 1
    assert not store.path(blob_id).exists()
    assert_consistent(store, blob_id, data)


@pytest.mark.parametrize("first", ["closed-port", "always-500", "corrupt", "oversize", "404"])
def test_second_mirror_rescues(
    tmp_path: Path, store: BlobStore, blob_id: str, data: bytes, first: str
) -> None:
    with make_repo(tmp_path / "a", data) as a, make_repo(tmp_path / "b", data) as b:
        urls = [a.url, b.url]
        if first == "closed-port":
            urls[0] = closed_port_url()
        elif first == "always-500":
            a.fail_500(n=None)
        elif first == "corrupt":
            a.corrupt(offset=SIZE // 2)
        elif first == "oversize":
            a.oversize(extra=1, no_length=True)
        else:
            (tmp_path / "a" / "v1" / blob_rel(blob_id)).unlink()
        f = fetcher(*urls, attempts=3)
        f.fetch_blob(blob_id, SIZE, store)
        assert_fetched(store, blob_id, data)
        expected_a = {"closed-port": 0, "always-500": 3}.get(first, 1)
        assert len(a.seen()) == expected_a
        assert [r.status for r in b.seen()] == [200]


def test_all_mirrors_failing_is_transport_error(
    tmp_path: Path, store: BlobStore, blob_id: str, data: bytes
) -> None:
    down = closed_port_url()
    with make_repo(tmp_path / "a", data) as a:
        a.fail_500(n=None)
        with pytest.raises(TransportError) as exc:
            fetcher(down, a.url, attempts=2).fetch_blob(blob_id, SIZE, store)
    assert exc.value.exit_code == 7
    msg = exc.value.message
    assert f"{down}/v1/{blob_rel(blob_id)}: connection refused" in msg
    assert f"{a.url}/v1/{blob_rel(blob_id)}: HTTP 500" in msg
    assert_consistent(store, blob_id, data)


def test_redirect_is_followed(tmp_path: Path, store: BlobStore, blob_id: str, data: bytes) -> None:
    with make_repo(tmp_path / "a", data) as a, make_repo(tmp_path / "b", data) as b:
        a.redirect(b.url)
        fetcher(a.url).fetch_blob(blob_id, SIZE, store)
        assert_fetched(store, blob_id, data)
        assert [r.status for r in a.seen()] == [302]
        assert [r.status for r in b.seen()] == [200]


def test_https_resume_and_certificate_checks(
    tmp_path: Path,
    store: BlobStore,
    blob_id: str,
    data: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert, key = self_signed(tmp_path / "tls")
    with (
        FlakyRepo(tmp_path / "a", tls=(cert, key)) as a,
        make_repo(tmp_path / "b", data) as b,
    ):
        put_blob(tmp_path / "a", data)
        # Not trusted: refused at once (no retries), and the next mirror serves.
        fetcher(a.url, b.url, attempts=3).fetch_blob(blob_id, SIZE, store)
        assert_fetched(store, blob_id, data)
        assert not a.seen() and len(b.seen()) == 1
        store.path(blob_id).unlink()
        # Trusted (as a private CA would be): a resumed download over TLS.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        a.truncate(n=1)
        fetcher(a.url).fetch_blob(blob_id, SIZE, store)
        assert_fetched(store, blob_id, data)
        first, second = a.seen()
        assert second.range_start == first.sent > 0 and second.status == 206
        # A redirect from https down to http is not followed.
        store.path(blob_id).unlink()
        a.redirect(b.url)
        with pytest.raises(TransportError, match="refusing a redirect from https"):
            fetcher(a.url).fetch_blob(blob_id, SIZE, store)
        assert len(b.seen()) == 1


# -- persistent faults: success or a typed error, never a corrupt store -------------------

Arm = Callable[[FlakyRepo], None]
PERSISTENT: dict[str, tuple[list[Arm], type[Exception] | None]] = {
    "fail_500": ([lambda r: r.fail_500(n=None)], TransportError),
    "truncate": ([lambda r: r.truncate(n=None)], TransportError),
    "truncate+ignore_range": (
        [lambda r: r.truncate(n=None), lambda r: r.ignore_range(n=None)],
        TransportError,
    ),
    "truncate+wrong_content_range": (
        [lambda r: r.truncate(n=None), lambda r: r.wrong_content_range(n=None)],
        TransportError,
    ),
    "truncate+change_etag": (
        [lambda r: r.truncate(n=None), lambda r: r.change_etag_midway(n=None)],
        TransportError,
    ),
    "slow_drip": ([lambda r: r.slow_drip(rate=32 * 1024, n=None)], TransportError),
    "ignore_range": ([lambda r: r.ignore_range(n=None)], None),
    "wrong_content_range": ([lambda r: r.wrong_content_range(n=None)], None),
    "change_etag": ([lambda r: r.change_etag_midway(n=None)], None),
    "oversize": ([lambda r: r.oversize(n=None)], VerificationError),
    "corrupt": ([lambda r: r.corrupt(offset=7, n=None)], VerificationError),
}


@pytest.mark.parametrize("mode", list(PERSISTENT))
def test_persistent_fault_outcome(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes, mode: str
) -> None:
    arms, outcome = PERSISTENT[mode]
    for arm in arms:
        arm(repo)
    f = fetcher(repo.url, attempts=3, min_rate=256 * 1024, rate_window=0.2)
    if outcome is None:
        f.fetch_blob(blob_id, SIZE, store)
        assert_fetched(store, blob_id, data)
    else:
        with pytest.raises(outcome) as exc:
            f.fetch_blob(blob_id, SIZE, store)
        assert repo.url in str(exc.value)
        assert not store.path(blob_id).exists()
        assert_consistent(store, blob_id, data)
    # Once the fault is gone the same store completes, from whatever was kept.
    repo.clear()
    fetcher(repo.url).fetch_blob(blob_id, SIZE, store)
    assert_fetched(store, blob_id, data)


# -- a download killed mid-way resumes in the next process --------------------------------

CHILD = """
import sys
from pathlib import Path
from spk_visor.ota.fetch import Fetcher
from spk_visor.ota.nodeconf import NodePaths
from spk_visor.ota.store import BlobStore
url, node, blob_id, size = sys.argv[1:]
f = Fetcher([url], timeout=10, attempts=1, min_rate=1,
            checkpoint_bytes=128 * 1024, checkpoint_s=0.1)
f.fetch_blob(blob_id, int(size), BlobStore(NodePaths(Path(node))))
"""


def test_sigkill_mid_download_resumes(
    repo: FlakyRepo, store: BlobStore, blob_id: str, data: bytes
) -> None:
    repo.slow_drip(rate=1024 * 1024, n=1)
    meta_path = store.partial(blob_id).with_suffix(".meta")
    argv = [sys.executable, "-c", CHILD, repo.url, str(store.paths.sysroot), blob_id, str(SIZE)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(argv, cwd=REPO_ROOT, env=env)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if int(str(meta_of(store, blob_id)["offset"])) >= 512 * 1024:
                    break
            except (FileNotFoundError, ValueError):
                pass
            assert child.poll() is None, "the download finished or died before the kill"
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint past 512 KiB within 10 s")
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert meta_path.exists() and not store.path(blob_id).exists()
    offset = int(str(meta_of(store, blob_id)["offset"]))
    assert 0 < offset < SIZE
    assert store.partial(blob_id).stat().st_size >= offset
    assert data.startswith(store.partial(blob_id).read_bytes()[:offset])

    fetcher(repo.url).fetch_blob(blob_id, SIZE, store)
    assert_fetched(store, blob_id, data)
    resumed = repo.seen()[-1]
    assert resumed.range_start == offset
    assert resumed.headers["if-range"] == repo.etag(blob_rel(blob_id))
    assert resumed.status == 206 and resumed.sent == SIZE - offset


# -- small documents ----------------------------------------------------------------------


def test_conditional_get_small(tmp_path: Path, data: bytes) -> None:
    doc = b'{"payloadType": "x", "payload": "y", "signatures": []}'
    put(tmp_path / "repo", "channels/stable.json", doc)
    with make_repo(tmp_path / "repo", data) as repo:
        f = fetcher(repo.url)
        first = f.get_small("channels/stable.json", cap=16384)
        assert (first.status, first.body) == (200, doc)
        assert first.etag == repo.etag("channels/stable.json")
        assert first.url == f"{repo.url}/v1/channels/stable.json"
        second = f.get_small("channels/stable.json", cap=16384, etag=first.etag)
        assert (second.status, second.body, second.etag) == (304, b"", first.etag)
        assert repo.seen()[-1].headers["if-none-match"] == first.etag
        # A new channel document gets a new ETag: the conditional GET returns it.
        repo.set_etag("channels/stable.json", '"v2"')
        third = f.get_small("channels/stable.json", cap=16384, etag=first.etag)
        assert (third.status, third.body, third.etag) == (200, doc, '"v2"')
        missing = f.get_small("root/2.root.json", cap=16384)
        assert (missing.status, missing.body) == (404, b"")


@pytest.mark.parametrize("no_length", [False, True], ids=["content-length", "close-delimited"])
def test_small_cap_is_enforced_without_retry(tmp_path: Path, data: bytes, no_length: bool) -> None:
    put(tmp_path / "repo", "manifests/m.json", b"m" * 1000)
    with make_repo(tmp_path / "repo", data) as repo:
        repo.oversize(extra=25, no_length=no_length)
        with pytest.raises(VerificationError, match="larger than 1024 bytes") as exc:
            fetcher(repo.url).get_small("manifests/m.json", cap=1024)
        assert exc.value.exit_code == 3
        assert len(repo.seen()) == 1
        repo.clear()
        ok = fetcher(repo.url).get_small("manifests/m.json", cap=1024)
        assert ok.body == b"m" * 1000


def test_small_retries_then_mirrors_then_fails(tmp_path: Path, data: bytes) -> None:
    put(tmp_path / "a", "channels/stable.json", b"A")
    put(tmp_path / "b", "channels/stable.json", b"B")
    down = closed_port_url()
    with make_repo(tmp_path / "a", data) as a, make_repo(tmp_path / "b", data) as b:
        a.fail_500(n=2)
        assert fetcher(a.url, b.url).get_small("channels/stable.json", 100).body == b"A"
        assert [r.status for r in a.seen()] == [500, 500, 200] and not b.seen()
        # The first mirror that answers is authoritative, 404 included.
        assert fetcher(a.url, b.url).get_small("root/9.root.json", 100).status == 404
        assert not b.seen()
        assert fetcher(down, b.url).get_small("channels/stable.json", 100).body == b"B"
        a.fail_500(n=None)
        a.truncate(n=None)
        with pytest.raises(TransportError) as exc:
            fetcher(down, a.url, attempts=2).get_small("channels/stable.json", 100)
        assert exc.value.exit_code == 7
        assert f"{down}/v1/channels/stable.json: connection refused" in exc.value.message
        assert f"{a.url}/v1/channels/stable.json: HTTP 500" in exc.value.message


def test_small_truncated_is_retried(tmp_path: Path, data: bytes) -> None:
    put(tmp_path / "repo", "channels/stable.json", b"x" * 4000)
    with make_repo(tmp_path / "repo", data) as repo:
        repo.truncate(n=1)
        got = fetcher(repo.url).get_small("channels/stable.json", 16384)
        assert got.body == b"x" * 4000
        assert [r.status for r in repo.seen()] == [200, 200]


def test_from_config() -> None:
    f = Fetcher.from_config(NodeConfig(base_urls=("http://a.example", "http://b.example")))
    assert list(f.base_urls) == ["http://a.example", "http://b.example"]
    assert f.url("http://a.example/", "channels/stable.json") == (
        "http://a.example/v1/channels/stable.json"
    )
    with pytest.raises(ConfigError):
        Fetcher.from_config(NodeConfig())
    with pytest.raises(ConfigError):
        Fetcher([]).get_small("channels/stable.json", 100)
    with pytest.raises(ValueError, match="not a repository path"):
        f.url("http://a.example", "../etc/passwd")
