"""Slowloris (issue 11 #2): sockets that never finish a request, from one address or many,
lock no one else out, and /api/health always answers."""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import threading
import time

import pytest

from tests.support.daemon import Daemon, DaemonEnv
from tests.support.hostile import (
    ATTACKER,
    baseline,
    closed,
    connect_from,
    exchange,
    prove,
    sockets,
    status_of,
)


def drip(held: list[socket.socket], stop: threading.Event, every: float) -> None:
    """One header line per socket every `every` seconds: each recv of the daemon returns
    well within any per-call timeout, but the request never ends."""
    for s in held:
        with contextlib.suppress(OSError):
            s.sendall(b"GET /api/node HTTP/1.1\r\nHost: x\r\n")
    n = 0
    while not stop.wait(every):
        n += 1
        for s in held:
            with contextlib.suppress(OSError):
                s.sendall(f"X-Drip-{n}: {n}\r\n".encode())


def test_dripping_and_silent_sockets_from_one_address_lock_no_one_out(
    daemon_env: DaemonEnv,
) -> None:
    d = Daemon(daemon_env)
    try:
        before = baseline(d)
        stop = threading.Event()
        with sockets() as silent, sockets() as dripping:
            for i in range(300):
                (silent if i % 2 else dripping).append(connect_from(ATTACKER, d.port))
            dripper = threading.Thread(target=drip, args=(dripping, stop, 0.5), daemon=True)
            dripper.start()
            try:
                time.sleep(1.0)  # the daemon has accepted them all by now
                for _ in range(20):
                    assert d.get("/api/health", timeout=10).status == 200
                    node = d.get("/api/node", timeout=10)
                    assert node.status == 200, node.raw
            finally:
                stop.set()
                dripper.join(timeout=10)
        prove(d, before)
    finally:
        d.stop()


def test_a_request_must_arrive_whole_within_the_request_timeout(
    daemon_env: DaemonEnv,
) -> None:
    """The deadline is for the whole head (and body), not per recv: a byte now and then
    does not keep a connection."""
    daemon_env.extra_env["SMECHVISORD_REQUEST_TIMEOUT"] = "2"
    d = Daemon(daemon_env)
    try:
        before = baseline(d)
        stop = threading.Event()
        with sockets() as head, sockets() as body, sockets() as quiet:
            head.append(connect_from(ATTACKER, d.port))
            body.append(connect_from(ATTACKER, d.port))
            quiet.append(connect_from(ATTACKER, d.port))
            body[0].sendall(
                f"POST /api/vfio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {d.token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
            )
            started = time.monotonic()
            heads = threading.Thread(target=drip, args=(head, stop, 0.3), daemon=True)
            heads.start()

            def drip_body() -> None:
                while not stop.wait(0.3):
                    with contextlib.suppress(OSError):
                        body[0].sendall(b" ")

            bodies = threading.Thread(target=drip_body, daemon=True)
            bodies.start()
            try:
                for s in (head[0], body[0], quiet[0]):
                    assert closed(s, timeout=10 - (time.monotonic() - started))
                assert time.monotonic() - started < 8
            finally:
                stop.set()
                heads.join(timeout=5)
                bodies.join(timeout=5)
        # A request that arrives in time is served as ever, on a kept-alive connection.
        with contextlib.closing(connect_from("127.0.0.1", d.port)) as s:
            for _ in range(3):
                s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
                time.sleep(0.5)
        assert d.env.recorded() == []  # the dripped VFIO request never ran
        prove(d, before)
    finally:
        d.stop()


def test_health_answers_when_every_worker_is_taken(daemon_env: DaemonEnv) -> None:
    """Many sources fill the whole pool: the OTA probation's /api/health still answers,
    everything else gets a prompt 503 (not a hang), and the pool frees when they go."""
    daemon_env.extra_env.update(
        SMECHVISORD_MAX_CONNECTIONS="16", SMECHVISORD_MAX_CONNECTIONS_PER_SOURCE="4"
    )
    d = Daemon(daemon_env)
    try:
        before = baseline(d)
        with sockets() as held:
            for host in range(10, 20):
                held += [connect_from(f"127.0.0.{host}", d.port) for _ in range(4)]
            time.sleep(0.5)
            for _ in range(5):
                answer = exchange(d, b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert status_of(answer) == 200, answer
                assert b'"status": "ok"' in answer
            started = time.monotonic()
            answer = exchange(
                d,
                f"GET /api/node HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {d.token}\r\n"
                "\r\n".encode(),
            )
            assert status_of(answer) == 503, answer
            assert b"Retry-After: 1" in answer
            assert time.monotonic() - started < 4
        prove(d, before)
    finally:
        d.stop()


def test_a_low_open_file_limit_does_not_let_a_flood_starve_accept(
    daemon_env: DaemonEnv,
) -> None:
    """Started with the common soft limit of 1024 open files (256 here), 400 held
    sockets made accept() fail: no one, /api/health included, got in."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard open-file limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        d = Daemon(daemon_env)  # inherits the low soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        before = baseline(d)
        stop = threading.Event()
        with sockets() as held:
            held += [connect_from(ATTACKER, d.port) for _ in range(400)]

            def reconnect() -> None:
                # What the daemon drops comes straight back: the flood never lets up.
                while not stop.is_set():
                    ready, _, _ = select.select(held, [], [], 0.2)
                    for s in ready:
                        held.remove(s)
                        s.close()
                        with contextlib.suppress(OSError):
                            held.append(connect_from(ATTACKER, d.port, timeout=1))

            flood = threading.Thread(target=reconnect, daemon=True)
            flood.start()
            try:
                time.sleep(3.0)  # past the overflow lane's first round of drops
                for _ in range(5):
                    assert d.get("/api/health", timeout=5).status == 200
                    assert d.get("/api/node", timeout=5).status == 200
            finally:
                stop.set()
                flood.join(timeout=10)
        prove(d, before)
    finally:
        d.stop()
