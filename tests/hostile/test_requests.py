"""Requests a proxy in front could read differently (issue 11 #11), JSON that reads two
ways (#12), and query numbers that are digits only to Unicode (#13)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support.daemon import Daemon, DaemonEnv, kill_vmms
from tests.support.hostile import baseline, exchange, prove, status_of
from tests.support.vmhelpers import create_vm


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, DaemonEnv]]:
    env = DaemonEnv(tmp_path_factory.mktemp("requests"))
    d = Daemon(env)
    yield d, env
    d.stop()
    kill_vmms(env.run_dir)
    env.cleanup()


def post(token: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST /api/vfio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode() + body


SMUGGLED = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("two differing Content-Length", 400),
        ("two equal Content-Length", 400),
        ("chunked", 501),
        ("gzip transfer coding", 501),
        ("chunked on a GET", 501),
        ("header line without a colon", 400),
        ("folded header line", 400),
        ("control character in a value", 400),
        ("two Host headers", 400),
        ("space before the colon", 400),
        ("a second Authorization header", 400),
        ("the right token second", 400),
    ],
)
def test_ambiguous_framing_is_refused(
    rig: tuple[Daemon, DaemonEnv], case: str, expected: int
) -> None:
    d, env = rig
    before = baseline(d)
    body = b'{"enable": true}'
    n = len(body)
    raw = {
        "two differing Content-Length": post(
            d.token, body + SMUGGLED, f"Content-Length: {n}\r\nContent-Length: {n + 5}\r\n"
        ),
        "two equal Content-Length": post(
            d.token, body, f"Content-Length: {n}\r\nContent-Length: {n}\r\n"
        ),
        "chunked": post(
            d.token,
            f"{n:x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
            "Transfer-Encoding: chunked\r\n",
        ),
        "gzip transfer coding": post(
            d.token, body, f"Transfer-Encoding: gzip\r\nContent-Length: {n}\r\n"
        ),
        "chunked on a GET": b"GET /api/health HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        # Python's parser used to end the headers here: Content-Length became body.
        "header line without a colon": post(d.token, body, f"X-Junk\r\nContent-Length: {n}\r\n"),
        "folded header line": post(
            d.token, body, f"X-A: 1\r\n continued\r\nContent-Length: {n}\r\n"
        ),
        "control character in a value": post(
            d.token, body, f"X-A: 1\x01\r\nContent-Length: {n}\r\n"
        ),
        "two Host headers": post(d.token, body, f"Host: y\r\nContent-Length: {n}\r\n"),
        "space before the colon": post(d.token, body, f"Content-Length : {n}\r\n"),
        # The daemon read the first, a proxy or log may read the last: which was checked?
        "a second Authorization header": post(
            d.token, body, f"Authorization: Bearer wrong\r\nContent-Length: {n}\r\n"
        ),
        "the right token second": post(
            "wrong", body, f"Authorization: Bearer {d.token}\r\nContent-Length: {n}\r\n"
        ),
    }[case]
    answer = exchange(d, raw)
    assert status_of(answer) == expected, answer
    # One answer, the connection closed: nothing after the head was read as a request.
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"Connection: close" in answer
    assert b'"error"' in answer
    assert env.recorded() == [], "the refused request ran modprobe"
    prove(d, before)


@pytest.mark.parametrize(
    "length",
    ["99999999999999999999999", "1" + "0" * 5000, "0" * 5000 + "99999"],
)
def test_a_content_length_past_18_digits_is_too_large(
    rig: tuple[Daemon, DaemonEnv], length: str
) -> None:
    """A length of many digits is a length, too large (413), not "not a number" (and a
    long one is never handed to int(), which refuses past 4300 digits)."""
    d, env = rig
    before = baseline(d)
    answer = exchange(d, post(d.token, b"{}", f"Content-Length: {length}\r\n"))
    assert status_of(answer) == 413, answer[:300]
    assert b'"payload_too_large"' in answer
    assert env.recorded() == []
    prove(d, before)


@pytest.mark.parametrize(
    "body",
    [
        b'{"enable": false, "enable": true}',
        b'{"enable": true, "enable": true}',
        b'{"enable": NaN}',
        b'{"enable": true, "x": Infinity}',
        b'{"enable": true, "x": -Infinity}',
        b'{"enable": true, "x": 1e999}',
        b'{"enable": true, "x": ' + b"[" * 9 + b"]" * 9 + b"}",
        b'{"enable": true, "x": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {}}}}}}}}}',
    ],
)
def test_json_that_reads_two_ways_is_refused(rig: tuple[Daemon, DaemonEnv], body: bytes) -> None:
    """`{"enable": false, "enable": true}` turned VFIO on: the last key won."""
    d, env = rig
    before = baseline(d)
    answer = exchange(d, post(d.token, body, f"Content-Length: {len(body)}\r\n"))
    assert status_of(answer) == 400, answer
    doc = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert doc["error"]["code"] == "invalid_json"
    assert env.recorded() == [], "modprobe ran"
    prove(d, before)


QUERIES = ("offset=%C2%B2", "max_bytes=%C2%B2", "offset=%D9%A3", "max_bytes=", "offset=1_0",
           "offset=+1", "offset=%201")  # fmt: skip


def test_console_numbers_are_ascii_digits(rig: tuple[Daemon, DaemonEnv]) -> None:
    """`?offset=%C2%B2` ('²', a digit to str.isdigit) answered 500 with a traceback."""
    d, env = rig
    vm = create_vm(d, env, name="console")
    try:
        before = baseline(d)
        for query in QUERIES:
            r = d.get(f"/api/vms/{vm['id']}/console?{query}")
            assert r.status == 400, (query, r.raw)
            assert r.json["error"]["details"]["field"] in ("offset", "max_bytes")
        assert d.get(f"/api/vms/{vm['id']}/console?offset=0&max_bytes=10").status == 200
        prove(d, before)
    finally:
        assert d.post(f"/api/vms/{vm['id']}/stop").status == 200
        assert d.request("DELETE", f"/api/vms/{vm['id']}").status == 200


def test_routes_are_not_listed_without_the_token(rig: tuple[Daemon, DaemonEnv]) -> None:
    """404 and 405 used to come before the token check, so anyone could map the API.
    Only the open route (/api/health) says anything without the token."""
    d, _ = rig
    before = baseline(d)
    for method, path in [("GET", "/api/nope"), ("GET", "/api/vms/nope/explode"),
                         ("PUT", "/api/vms"), ("DELETE", "/api/node"),
                         ("GET", "/api/vms/x/shutdown")]:  # fmt: skip
        assert d.request(method, path, token=None).status == 401, (method, path)
        assert d.request(method, path, token="wrong").status == 403, (method, path)
    assert d.request("POST", "/api/health", token=None).status == 405
    assert d.get("/api/nope").status == 404  # with the token, the answer is as before
    prove(d, before)


def test_the_auth_scheme_is_case_insensitive(rig: tuple[Daemon, DaemonEnv]) -> None:
    """RFC 9110 section 11.1: the scheme name is case-insensitive, so `bearer TOKEN` (as some
    HTTP clients spell it) was answered 401 "missing bearer token" with the token right there.
    Other schemes and a wrong token are still refused."""
    d, _ = rig
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = d.get("/api/node", token=None, headers={"Authorization": f"{scheme} {d.token}"})
        assert r.status == 200, (scheme, r.raw)
    assert (
        d.get("/api/node", token=None, headers={"Authorization": f"Basic {d.token}"}).status == 401
    )
    assert d.get("/api/node", token=None, headers={"Authorization": "bearer wrong"}).status == 403
