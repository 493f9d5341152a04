"""TLS on the API port (issue 11, "A sniffer on the LAN reads the token today"): the real
daemon, the real CLI, real handshakes on loopback, and a network namespace pair for the
one thing loopback cannot show (a non-loopback peer speaking plain HTTP).

A loopback peer may speak plain HTTP, so every test here that means TLS speaks it
explicitly (https:// URLs, ssl-wrapped sockets).
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smechvisord import tls
from tests.support import cli, netns
from tests.support.daemon import Daemon, DaemonEnv, kill_vmms, wait_for

OPENSSL = "/usr/bin/openssl"


@pytest.fixture
def known_certs(tmp_path: Path) -> Path:
    return tmp_path / "cfg" / "known_certs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spk(daemon: Daemon, known_certs: Path, *argv: str) -> cli.Result:
    env = {"SPK_VISOR_TOKEN": daemon.token, "SPK_VISOR_KNOWN_CERTS": str(known_certs)}
    return cli.run(*argv, env=env)


def tls_get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    """One GET over TLS on loopback (certificate not checked: the test is of the server)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw) as s,
    ):
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def make_ca(root: Path, name: str) -> tuple[Path, Path]:
    """A private CA (cert, key) made with the openssl CLI."""
    root.mkdir(parents=True, exist_ok=True)
    cert, key = root / f"{name}.crt", root / f"{name}.key"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def issue(ca: tuple[Path, Path], out: Path, key: Path, san: str) -> None:
    """A leaf for `san` signed by `ca`, written to `out` and `key`."""
    csr = out.with_suffix(".csr")
    subprocess.run(
        [OPENSSL, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=node", "-keyout", str(key), "-out", str(csr)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    ext = out.with_suffix(".ext")
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    subprocess.run(
        [OPENSSL, "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(out)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


@pytest.fixture
def tls_env(tmp_path: Path) -> Iterator[DaemonEnv]:
    if not Path(OPENSSL).exists():
        pytest.skip("openssl not found: install the Debian package openssl")
    env = DaemonEnv(tmp_path / "node")
    yield env
    kill_vmms(env.run_dir)
    env.cleanup()


# ---- the daemon's certificate -------------------------------------------------------


def test_first_start_makes_a_0600_key_and_shows_the_fingerprint_everywhere(
    tls_env: DaemonEnv, known_certs: Path
) -> None:
    assert not tls_env.tls_cert.exists()
    daemon = Daemon(tls_env)
    try:
        assert stat.S_IMODE(tls_env.tls_key.stat().st_mode) == 0o600
        # The same fingerprint in the log, in --print-fingerprint, from openssl itself,
        # and on the wire.
        logged = daemon.fingerprint
        printed = subprocess.run(
            [sys.executable, "-m", "smechvisord", "--print-fingerprint"],
            env=tls_env.env(), capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert f"SHA256 Fingerprint={logged}" in printed
        by_openssl = subprocess.run(
            [OPENSSL, "x509", "-in", str(tls_env.tls_cert), "-noout", "-fingerprint", "-sha256"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert by_openssl.strip().split("=", 1)[1] == logged
        pem = ssl.get_server_certificate(("127.0.0.1", daemon.port), timeout=30)
        assert tls.fingerprint(ssl.PEM_cert_to_DER_cert(pem)) == logged
        # TLS and plain HTTP on the one port, for a loopback client.
        status, body = tls_get(daemon.port, "/api/node", daemon.token)
        assert status == 200 and "cpu_model" in json.loads(body)
        assert daemon.get("/api/health").status == 200
    finally:
        daemon.stop()
    # A restart keeps the certificate: pinned clients keep working.
    daemon = Daemon(tls_env)
    try:
        assert daemon.fingerprint == logged
    finally:
        daemon.stop()


def test_an_operator_certificate_is_served_and_never_replaced(
    tls_env: DaemonEnv, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path / "ca", "op-ca")
    tls_env.tls_cert.parent.mkdir(parents=True, exist_ok=True)
    issue(ca, tls_env.tls_cert, tls_env.tls_key, "IP:127.0.0.1")
    before = tls_env.tls_cert.read_bytes()
    daemon = Daemon(tls_env)
    try:
        ctx = ssl.create_default_context(cafile=str(ca[0]))
        with (
            socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
        ):
            assert s.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        daemon.stop()
    assert tls_env.tls_cert.read_bytes() == before


def test_half_a_pair_is_not_overwritten_and_loopback_still_works(tls_env: DaemonEnv) -> None:
    tls_env.tls_key.parent.mkdir(parents=True, exist_ok=True)
    tls_env.tls_key.write_bytes(b"an operator's key, whose certificate is not installed yet\n")
    daemon = Daemon(tls_env)
    try:
        assert any("TLS unavailable" in line for line in daemon.lines), daemon.lines
        assert daemon.get("/api/health").status == 200  # plain, loopback: still served
        with pytest.raises((ssl.SSLError, OSError)):
            tls_get(daemon.port, "/api/health")
    finally:
        daemon.stop()
    assert not tls_env.tls_cert.exists()
    assert tls_env.tls_key.read_bytes().startswith(b"an operator's key")


# ---- the CLI pins the certificate ---------------------------------------------------


def test_cli_pins_on_first_use_and_refuses_a_changed_certificate(
    tls_env: DaemonEnv, known_certs: Path
) -> None:
    port = free_port()
    tls_env.extra_env["SMECHVISORD_BIND"] = f"127.0.0.1:{port}"
    url = f"https://127.0.0.1:{port}"
    daemon = Daemon(tls_env)
    try:
        first = daemon.fingerprint
        unknown = spk(daemon, known_certs, "--node", url, "--json", "node")
        assert unknown.code == 3, unknown
        assert first in unknown.err and "--accept-new" in unknown.err
        assert not known_certs.exists()

        accepted = spk(daemon, known_certs, "--node", url, "--accept-new", "--json", "node")
        assert accepted.code == 0, accepted
        assert "cpu_model" in json.loads(accepted.out)
        assert known_certs.read_text() == f"127.0.0.1:{port} sha256 {first}\n"
        assert stat.S_IMODE(known_certs.stat().st_mode) == 0o600
        assert stat.S_IMODE(known_certs.parent.stat().st_mode) == 0o700

        again = spk(daemon, known_certs, "--node", url, "--json", "node")
        assert again.code == 0, again
    finally:
        daemon.stop()

    # The node gets a new certificate (reinstalled, or someone in the middle).
    tls_env.tls_cert.unlink()
    tls_env.tls_key.unlink()
    daemon = Daemon(tls_env)
    try:
        second = daemon.fingerprint
        assert second != first
        for extra in ([], ["--accept-new"]):
            changed = spk(daemon, known_certs, "--node", url, *extra, "vm", "list")
            assert changed.code == 3, changed
            assert "CHANGED" in changed.err
            assert first in changed.err and second in changed.err
        assert known_certs.read_text() == f"127.0.0.1:{port} sha256 {first}\n"
    finally:
        daemon.stop()


def test_ca_file_verifies_chain_and_name_instead_of_pinning(
    tls_env: DaemonEnv, known_certs: Path, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path / "ca", "fleet-ca")
    other_ca = make_ca(tmp_path / "ca", "other-ca")
    tls_env.tls_cert.parent.mkdir(parents=True, exist_ok=True)
    issue(ca, tls_env.tls_cert, tls_env.tls_key, "DNS:localhost")
    daemon = Daemon(tls_env)
    try:
        good = f"https://localhost:{daemon.port}"
        ok = spk(daemon, known_certs, "--node", good, "--ca-file", str(ca[0]), "--json", "node")
        assert ok.code == 0, ok
        assert not known_certs.exists()  # nothing pinned
        wrong_ca = spk(daemon, known_certs, "--node", good, "--ca-file", str(other_ca[0]), "node")
        assert wrong_ca.code == 3, wrong_ca
        assert "failed verification" in wrong_ca.err
        # The certificate names localhost, not 127.0.0.1: the name is checked too.
        by_ip = f"https://127.0.0.1:{daemon.port}"
        wrong_name = spk(daemon, known_certs, "--node", by_ip, "--ca-file", str(ca[0]), "node")
        assert wrong_name.code == 3, wrong_name
        missing = spk(
            daemon, known_certs, "--node", good, "--ca-file", str(tmp_path / "no"), "node"
        )
        assert missing.code == 2, missing
    finally:
        daemon.stop()


def test_plain_http_to_a_remote_node_is_refused_before_connecting(known_certs: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: the refusal must come before any packet is sent.
    started = time.monotonic()
    result = cli.run("--node", "http://192.0.2.10:8080", "--token", "t" * 20, "node")
    assert result.code == 2, result
    assert "https://192.0.2.10:8080" in result.err and "--insecure-http" in result.err
    assert time.monotonic() - started < 5
    fleet_cfg = known_certs.parent / "config.toml"
    fleet_cfg.parent.mkdir(parents=True, exist_ok=True)
    fleet_cfg.write_text('[nodes.a]\nurl = "http://node-a.example:8080"\n[groups]\nrack = ["a"]\n')
    fleet = cli.run("--fleet", "rack", "--token", "t" * 20, "node", env={
        "SPK_VISOR_CONFIG": str(fleet_cfg)})  # fmt: skip
    assert fleet.code == 2, fleet


def test_loopback_http_default_still_works(daemon: Daemon, known_certs: Path) -> None:
    result = spk(daemon, known_certs, "--node", daemon.url, "--json", "node")
    assert result.code == 0, result
    assert not known_certs.exists()


# ---- the handshake happens in the worker, against a deadline -------------------------


def test_stalled_handshakes_neither_block_others_nor_stay_open(tls_env: DaemonEnv) -> None:
    tls_env.extra_env["SMECHVISORD_SOCKET_TIMEOUT"] = "3"
    daemon = Daemon(tls_env)
    stalled: list[socket.socket] = []
    try:
        # Each opens a TLS record and stops: the handshake can never finish.
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
            s.sendall(b"\x16\x03\x01")
            stalled.append(s)
        started = time.monotonic()
        status, _ = tls_get(daemon.port, "/api/health")
        assert status == 200
        # Far below the 3 s deadline the stalled ones hold: nobody waited for them.
        assert time.monotonic() - started < 2.5
        for s in stalled:
            s.settimeout(20)
            assert s.recv(1) == b"", "a stalled handshake was kept open past its deadline"
        assert daemon.alive()
        status, _ = tls_get(daemon.port, "/api/health")
        assert status == 200
    finally:
        for s in stalled:
            s.close()
        daemon.stop()


def test_a_dripped_client_hello_is_cut_off_at_the_deadline(tls_env: DaemonEnv) -> None:
    # One byte every 0.5 s never trips a per-read timeout of 3 s; the deadline is total.
    tls_env.extra_env["SMECHVISORD_SOCKET_TIMEOUT"] = "3"
    daemon = Daemon(tls_env)
    try:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
            started = time.monotonic()
            s.sendall(b"\x16\x03\x01\x02\x00")  # a handshake record of 512 bytes: waits
            closed_after = None
            while time.monotonic() - started < 30:
                readable, _, _ = select.select([s], [], [], 0.5)
                if readable:
                    try:
                        if s.recv(1) == b"":
                            closed_after = time.monotonic() - started
                            break
                    except ConnectionResetError:
                        closed_after = time.monotonic() - started
                        break
                try:
                    s.sendall(b"\x00")
                except (BrokenPipeError, ConnectionResetError):
                    closed_after = time.monotonic() - started
                    break
            assert closed_after is not None, "a dripping handshake was served for 30 s"
            assert closed_after < 12, closed_after
        assert tls_get(daemon.port, "/api/health")[0] == 200
    finally:
        daemon.stop()


# ---- a non-loopback peer: network namespaces -----------------------------------------

PLAIN_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(b"GET /api/node HTTP/1.1\\r\\nHost: n\\r\\nAuthorization: Bearer " + sys.argv[3].encode()
          + b"\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.stdout.write(data.decode())
"""

TLS_CLIENT = """
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
raw = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s = ctx.wrap_socket(raw)
s.sendall(b"GET /api/node HTTP/1.1\\r\\nHost: n\\r\\nAuthorization: Bearer " + sys.argv[3].encode()
          + b"\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.stdout.write(data.decode())
"""


@pytest.fixture
def segment() -> Iterator[netns.Segment]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    seg = netns.create(("donor", "target"))
    yield seg
    seg.cleanup()


def test_plain_http_from_another_machine_is_refused_and_tls_is_served(
    tls_env: DaemonEnv, segment: netns.Segment
) -> None:
    port = 8080
    tls_env.extra_env["SMECHVISORD_BIND"] = f"0.0.0.0:{port}"
    daemon = Daemon(tls_env, prefix=segment.argv("target", []))
    try:
        node = segment.address("target")

        def client(script: str, host: str, where: str) -> str:
            return segment.run(where, [sys.executable, "-c", script, host, str(port), daemon.token])

        refused = client(PLAIN_CLIENT, node, "donor")
        # (text mode: the client's CRLFs arrive as newlines)
        head, _, body = refused.replace("\r\n", "\n").partition("\n\n")
        assert head.startswith("HTTP/1.1 400"), refused
        error = json.loads(body)["error"]
        assert error["code"] == "tls_required"
        assert f"https://{node}:{port}/" in error["message"]
        served = client(TLS_CLIENT, node, "donor")
        assert served.startswith("HTTP/1.1 200"), served
        assert "cpu_model" in served
        # On the node itself, loopback plain HTTP (the node shell, the SSH tunnel).
        local = client(PLAIN_CLIENT, "127.0.0.1", "target")
        assert local.startswith("HTTP/1.1 200"), local
        # The refused request never reached the API: access-log lines for the served two.
        donor = segment.address("donor")
        wait_for(lambda: sum("GET /api/node" in line for line in daemon.lines) >= 2)
        api_lines = [line for line in daemon.lines if "GET /api/node" in line]
        assert [line.split("access: ")[1].split()[0] for line in api_lines] == [donor, "127.0.0.1"]
    finally:
        daemon.stop()
