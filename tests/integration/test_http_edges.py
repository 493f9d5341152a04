"""HTTP edge cases: bodies on methods that take none, pathological JSON, odd static
paths, log lines from hostile paths. The daemon answers with JSON and keeps serving."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, DaemonEnv, kill_vmms, wait_for


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, DaemonEnv]]:
    env = DaemonEnv(tmp_path_factory.mktemp("edges"))
    web = env.root / "web"
    web.mkdir()
    (web / "index.html").write_text("<!doctype html><title>t</title>\n")
    env.extra_env["SMECHVISORD_WEB_DIR"] = str(web)
    d = Daemon(env)
    yield d, env
    d.stop()
    kill_vmms(env.run_dir)
    env.cleanup()


def exchange(d: Daemon, raw: bytes, wait: float = 2.0) -> bytes:
    """Send raw bytes on one connection; everything the daemon answers until it closes
    or goes quiet."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=wait) as s:
        s.sendall(raw)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except TimeoutError:
            pass
    return data


def test_body_on_a_get_is_not_read_as_the_next_request(rig: tuple[Daemon, DaemonEnv]) -> None:
    """A GET (or DELETE) with a body: that body must not be parsed as a second request on
    the kept-alive connection (a desync a proxy in front would not see)."""
    d, _ = rig
    smuggled = f"GET /api/node HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {d.token}\r\n\r\n"
    for method in ("GET", "DELETE"):
        raw = (
            f"{method} /api/health HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(smuggled)}\r\n\r\n{smuggled}"
        ).encode()
        data = exchange(d, raw)
        assert data.count(b"HTTP/1.1 ") == 1, data
        assert b"connection: close" in data.lower()
        assert b"cpu_model" not in data


def test_deeply_nested_json_is_a_400(rig: tuple[Daemon, DaemonEnv]) -> None:
    d, _ = rig
    seen = len(d.lines)
    r = d.post("/api/vms", raw=b"[" * 60000, headers={"Content-Type": "application/json"})
    assert r.status == 400, r.raw[:200]
    assert r.error_code == "invalid_json"
    assert not any("Traceback" in line for line in d.lines[seen:])


@pytest.mark.parametrize("length", ["1_5", "+15"])
def test_content_length_must_be_plain_digits(rig: tuple[Daemon, DaemonEnv], length: str) -> None:
    """Python's int() takes "1_0", "+10" and other digits; HTTP takes 1*DIGIT. A front
    proxy and the daemon disagreeing on a body's length is a request smuggling vector."""
    d, _ = rig
    raw = (
        f"POST /api/vfio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {d.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        '{"enable":true}'
    ).encode()
    data = exchange(d, raw)
    assert data.startswith(b"HTTP/1.1 400 "), data[:100]
    assert data.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize("path", ["/%00", "/index.html%00.png", "/%2e%2e/%2e%2e/etc/passwd"])
def test_odd_static_paths_are_404(rig: tuple[Daemon, DaemonEnv], path: str) -> None:
    d, _ = rig
    seen = len(d.lines)
    r = d.get(path, token=None)
    assert r.status == 404, r.raw[:200]
    assert r.error_code == "not_found"
    assert not any("Traceback" in line for line in d.lines[seen:])


def test_control_characters_in_paths_do_not_reach_the_log_raw(
    rig: tuple[Daemon, DaemonEnv],
) -> None:
    """The access log echoes the path: a terminal escape in it must not arrive as a live
    escape sequence for whoever tails the log. A raw one is refused with the request line
    (400, not logged); a percent-encoded one is logged as sent."""
    d, _ = rig
    data = exchange(d, b"GET /api/\x1b[2Jx HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    exchange(d, b"GET /api/%1b[2Jy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert wait_for(lambda: any("/api/%1b[2Jy 401 " in line for line in d.lines))
    assert not any("\x1b" in line for line in d.lines)


def test_index_served_and_head_has_no_body(rig: tuple[Daemon, DaemonEnv]) -> None:
    d, env = rig
    assert d.get("/", token=None).raw == Path(env.root / "web" / "index.html").read_bytes()
    data = exchange(d, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b""
