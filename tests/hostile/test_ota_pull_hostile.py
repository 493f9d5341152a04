"""`spk-visor ota pull` against a hostile mirror (issue 11, defect 3, and redirects).

A real `spk-visor ota pull` process talks to tests/support/hostile_mirror.py on 127.0.0.1,
which serves a real published repository but attacks one kind of request: it drips the
status line or the headers, stalls, or sends endless headers or an endless body. Every run
must end within fetch_timeout_s + 5 s (it used to run for minutes, holding the OTA lock).
Each test ends with the same proof: the pull exited with a clear code and no traceback
(nothing crashed), nothing unverified is in the store and a good mirror then completes the
same pull (nothing lost, no one got in, the service still serves, the lock is free).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spk_visor.ota.store import BlobStore
from tests.integration.test_ota_pull import _conf, _publish
from tests.support.flaky_repo import FlakyRepo
from tests.support.hostile_mirror import HostileMirror
from tests.support.ota_pki import Node, Pki, make_node

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 3.0
SLACK = 5.0


# A pull as an operator at a terminal runs it: no unattended backoff after the failed run.
INTERACTIVE_PULL = """
import sys
from spk_visor.errors import SpkVisorError
from spk_visor.ota import pull
from spk_visor.ota.context import load_context
try:
    code, _ = pull.run(load_context(), pull.PullOptions(interactive=True))
except SpkVisorError as e:
    print(e.message, file=sys.stderr)
    code = int(e.exit_code)
sys.exit(int(code))
"""


def _pull(node: Node, limit: float, *, interactive: bool = False) -> tuple[int, str, float]:
    """(exit code, stderr, when it ended by time.monotonic()); code -1: still running."""
    env = {
        **os.environ,
        **node.env,
        "SPK_VISOR_CONFIG": "/nonexistent",
        "PYTHONPATH": str(REPO_ROOT),
    }
    argv = ["-c", INTERACTIVE_PULL] if interactive else ["-m", "spk_visor", "ota", "pull", "--json"]
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        return -1, err, time.monotonic()
    return proc.returncode, err, time.monotonic()


def _store_is_clean(node: Node) -> None:
    """Every blob in the store is what its name says (nothing unverified got in)."""
    blobs = BlobStore(node.paths).blobs_dir
    for path in blobs.iterdir() if blobs.exists() else []:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path


def _proof(tmp_path: Path, node: Node, repo_dir: Path, code: int, err: str) -> None:
    assert "Traceback" not in err, err
    _store_is_clean(node)
    with FlakyRepo(repo_dir) as good:
        _conf(node, [good.url], fetch_timeout_s=TIMEOUT, fetch_attempts=4)
        again, err2, _ = _pull(node, 120, interactive=True)
    assert again == 0, err2
    _store_is_clean(node)


CASES = [
    ("drip_status", "channels/"),
    ("drip_headers", "channels/"),
    ("stall", "channels/"),
    ("endless_headers", "channels/"),
    ("endless_body", "channels/"),
    ("drip_status", "blobs/"),
    ("drip_headers", "blobs/"),
    ("stall", "blobs/"),
    ("drip_body", "blobs/"),
    ("endless_body", "blobs/"),
]


@pytest.mark.parametrize(("mode", "where"), CASES)
def test_hostile_mirror_cannot_hold_a_pull(tmp_path: Path, mode: str, where: str) -> None:
    pki = Pki()
    node = make_node(tmp_path / "node", pki)
    repo_dir = tmp_path / "repo"
    _publish(tmp_path, pki, repo_dir, size=256 << 10)
    with HostileMirror(repo_dir, mode, where, interval=0.4) as mirror:
        _conf(node, [mirror.url], fetch_timeout_s=TIMEOUT, fetch_attempts=4, fetch_backoff_s=0.05)
        code, err, ended = _pull(node, 60)
        assert mirror.hits >= 1 and mirror.first_request is not None
    assert code != -1, f"still running after 60 s: {err[-2000:]}"
    # From the first request (the interpreter's start-up is not the mirror's doing).
    took = ended - mirror.first_request
    assert took <= TIMEOUT + SLACK, (took, err[-2000:])
    # Unreachable/transient (7), or refused unread (3) for a document over its cap.
    assert code in (3, 7), (code, err)
    _proof(tmp_path, node, repo_dir, code, err)


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "ftp://127.0.0.1/v1/channels/stable.json",
        "file:///etc/passwd",
        "https://127.0.0.1:1/v1/channels/stable.json",
    ],
)
def test_redirects_to_another_scheme_or_the_metadata_service_are_refused(
    tmp_path: Path, location: str
) -> None:
    pki = Pki()
    node = make_node(tmp_path / "node", pki)
    repo_dir = tmp_path / "repo"
    _publish(tmp_path, pki, repo_dir, size=64 << 10)
    with HostileMirror(repo_dir, "redirect", "channels/", location=location) as mirror:
        _conf(node, [mirror.url], fetch_timeout_s=TIMEOUT, fetch_attempts=4, fetch_backoff_s=0.05)
        code, err, _ = _pull(node, 60)
        assert mirror.hits == 1, "a refused redirect is not retried"
    assert code == 7, (code, err)
    assert "redirect" in err, err
    _proof(tmp_path, node, repo_dir, code, err)
