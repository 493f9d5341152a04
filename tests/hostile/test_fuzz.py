"""Property tests: what hypothesis makes of the daemon's request parsing, its JSON bodies
and its record.json loading. CI runs a bounded number of examples; `make fuzz` many more.

Every request goes to a real daemon over loopback; the records go through the daemon's
own VmManager.load(). Whatever the input: no 500, no traceback, the daemon keeps serving,
and a record either loads as a well-formed VM or is listed as broken.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smechvisord import protocol as p
from smechvisord import settings as settings_mod
from smechvisord.host import Host
from smechvisord.vms import VmManager
from tests.support.daemon import Daemon, DaemonEnv, kill_vmms
from tests.support.hostile import baseline, exchange, prove

pytestmark = pytest.mark.fuzz

STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")
# Everything the daemon may answer to a request it did not like, and the successes.
ALLOWED = {200, 201, 202, 400, 401, 403, 404, 405, 409, 413, 414, 415, 431, 501, 502, 503,
           505}  # fmt: skip
TOKEN = "\0token\0"  # replaced by the daemon's token when a request is built


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, DaemonEnv]]:
    env = DaemonEnv(tmp_path_factory.mktemp("fuzz"))
    # Short deadlines: a request hypothesis cut short ends in a second, not fifteen.
    env.extra_env.update(SMECHVISORD_REQUEST_TIMEOUT="1", SMECHVISORD_SOCKET_TIMEOUT="1")
    d = Daemon(env)
    yield d, env
    d.stop()
    kill_vmms(env.run_dir)
    env.cleanup()


def check(d: Daemon, answer: bytes) -> None:
    statuses = [int(code) for code in STATUS.findall(answer)]
    assert set(statuses) <= ALLOWED, answer[:600]
    assert b'"internal_error"' not in answer, answer[:600]  # a client's mistake is no fault
    assert d.alive()


# ---- request heads -------------------------------------------------------------------

TOKENS = st.text(alphabet="!#$%&'*+-.^_`|~abcXYZ019", min_size=1, max_size=12)
LINE_BYTES = st.binary(max_size=40)
PATHS = st.sampled_from(
    ["/api/health", "/api/node", "/api/vms", "/api/vms/x", "/api/vms/x/console?offset=1",
     "/api/vfio", "/", "/index.html", "/api/vms/%2e%2e", "//api//vms", "*", "/api/vms/x/stop"]
)  # fmt: skip
HEADER_NAMES = st.sampled_from(
    ["Host", "Content-Length", "Transfer-Encoding", "Content-Type", "Authorization",
     "Connection", "Expect", "X-A"]
) | TOKENS  # fmt: skip
HEADER_VALUES = st.sampled_from(
    ["0", "5", "12", "-1", "1_0", " 7 ", "chunked", "application/json", f"Bearer {TOKEN}",
     "Bearer wrong", "close", "keep-alive", "100-continue", "x"]
) | st.text(max_size=20)  # fmt: skip
SEPARATORS = st.sampled_from([": ", ":", " : ", "", ":\t", ": \x00", "\r\n "])
ENDINGS = st.sampled_from(["\r\n", "\n", "\r"])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "DELETE", "HEAD", "PUT", "OPTIONS"]) | TOKENS)
    target = draw(PATHS | st.text(max_size=30))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", ""]))
    eol = draw(ENDINGS)
    lines = [f"{method} {target} {version}".rstrip(" ")]
    for _ in range(draw(st.integers(0, 6))):
        lines.append(draw(HEADER_NAMES) + draw(SEPARATORS) + draw(HEADER_VALUES))
    head = (eol.join(lines) + eol + eol).replace(TOKEN, "{token}")
    raw = head.encode("utf-8", "surrogateescape")
    if draw(st.booleans()):
        raw += draw(LINE_BYTES)  # a body, or junk, or a second request's start
    if draw(st.booleans()):
        raw = draw(LINE_BYTES) + raw
    return raw


@given(raw=heads())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_request_heads(rig: tuple[Daemon, DaemonEnv], raw: bytes) -> None:
    d, _ = rig
    check(d, exchange(d, raw.replace(b"{token}", d.token.encode()), wait=10, half_close=True))


# ---- JSON bodies -----------------------------------------------------------------------

KEYS = st.sampled_from(
    [p.KEY_CPUS, p.KEY_MEMORY_MB, p.KEY_DISK, p.KEY_NAME, p.KEY_DRY_RUN, p.KEY_ENABLE,
     p.KEY_TIMEOUT]
) | st.text(max_size=8)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from([1, 2, 128, 512, 4096, "fz", "/nonexistent", "../x"])
)
DOCS = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=12,
)  # fmt: skip
ROUTES = st.sampled_from(
    ["/api/vms", "/api/vfio", "/api/vms/fz/stop", "/api/vms/fz/shutdown", "/api/vms/fz/start",
     "/api/vms/fz/pause"]
)  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["doc", "duplicate", "raw", "constant"]))
    if kind == "doc":
        return json.dumps(draw(DOCS)).encode()
    if kind == "duplicate":
        key = json.dumps(draw(KEYS))
        a, b = json.dumps(draw(SCALARS)), json.dumps(draw(SCALARS))
        return f"{{{key}: {a}, {key}: {b}}}".encode()
    if kind == "constant":
        return b'{"enable": ' + draw(st.sampled_from([b"NaN", b"Infinity", b"-1e999", b"1e400"]))
    return draw(st.binary(max_size=200))


@given(route=ROUTES, body=bodies(), disk=st.booleans())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_json_bodies(
    rig: tuple[Daemon, DaemonEnv], route: str, body: bytes, disk: bool
) -> None:
    d, env = rig
    if disk:  # point some creates at a real image, so they get past the disk check
        body = body.replace(b'"/nonexistent"', json.dumps(str(env.disk)).encode())
    r = d.request("POST", route, raw=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status in ALLOWED, r.raw[:600]
    assert b'"internal_error"' not in r.raw, r.raw[:600]
    if r.status >= 400:
        assert "error" in r.json
    if r.status == 201:  # a valid create: stop and remove it again
        vm_id = r.json["id"]
        assert d.post(f"/api/vms/{vm_id}/stop").status == 200
        assert d.request("DELETE", f"/api/vms/{vm_id}").status == 200
    assert d.alive()


def test_fuzz_daemon_survived(rig: tuple[Daemon, DaemonEnv]) -> None:
    """Runs after the property tests of this module in file order, and on its own too."""
    d, _ = rig
    prove(d, baseline(d))
    assert not [line for line in d.lines if "internal error" in line]


# ---- record.json loading -----------------------------------------------------------------


def valid_record(vm_id: str) -> dict[str, Any]:
    return {
        "id": vm_id, "uuid": "6f1c3a52-0000-4000-8000-000000000001", "cpus": 1,
        "memory_mb": 256, "disk": "/images/disk.img", "argv": ["cloud-hypervisor"],
        "created_at": 1700000000.0, "state": "stopped", "pid": None, "pid_start": None,
        "started_at": None, "exit": None, "last_shutdown": None, "disk_id": None,
    }  # fmt: skip


FIELDS = st.sampled_from(sorted(valid_record("x")))


@st.composite
def record_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mutated", "dropped", "doc", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=300))
    if kind == "doc":
        return json.dumps(draw(DOCS)).encode()
    record = valid_record("rec")
    field = draw(FIELDS)
    if kind == "dropped":
        del record[field]
    else:
        record[field] = draw(DOCS)
    return json.dumps(record).encode()


@pytest.fixture(scope="module")
def state_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("records")


@given(raw=record_files())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_record_loading(state_root: Path, raw: bytes) -> None:
    root = state_root / "case"
    shutil.rmtree(root, ignore_errors=True)
    (root / "state" / "machines" / "rec").mkdir(parents=True)
    (root / "state" / "machines" / "rec" / "record.json").write_bytes(raw)
    cfg = settings_mod.load(
        [], {"SMECHVISORD_STATE_DIR": str(root / "state"),
             "SMECHVISORD_RUN_DIR": str(root / "run"), "SMECHVISORD_CH_BIN": "/nonexistent"}
    )  # fmt: skip
    vms = VmManager(cfg, Host(cfg.sysroot))
    vms.load()  # never raises
    listing = json.loads(vms.list_all_encoded())
    ours = [v for v in listing if v["managed"]]
    assert len(ours) == 1
    vm = ours[0]
    assert vm["id"] == "rec"
    if vm["state"] == p.STATE_BROKEN:
        assert vm["broken"]
    else:
        assert vm["state"] in p.VM_STATES
        assert isinstance(vm["cpus"], int) and not isinstance(vm["cpus"], bool)
        assert isinstance(vm["created_at"], (int, float))
    shutil.rmtree(root, ignore_errors=True)
