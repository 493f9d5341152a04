"""The pieces of TLS that need no daemon: the node's certificate files (made with the real
openssl CLI), the names it carries, and the CLI's known_certs and URL policy."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from smechvisord import tls
from spk_visor.errors import ConfigError, ExitCode
from spk_visor.transport import tls_pinning

SANS = ["DNS:node1", "DNS:localhost", "IP:127.0.0.1", "IP:::1", "IP:10.1.2.3"]


def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("openssl not found: install the Debian package openssl")
    return path


def test_generate_makes_a_private_key_and_a_certificate_naming_the_host(tmp_path: Path) -> None:
    cert, key = tmp_path / "etc" / "tls.crt", tmp_path / "etc" / "tls.key"
    assert tls.ensure(cert, key, SANS, openssl()) is True
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    text = subprocess.run(
        [openssl(), "x509", "-in", str(cert), "-noout", "-text", "-fingerprint", "-sha256"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert "DNS:node1, DNS:localhost, IP Address:127.0.0.1" in text
    assert "IP Address:10.1.2.3" in text
    assert "TLS Web Server Authentication" in text
    assert f"Fingerprint={tls.fingerprint(tls.leaf_der(cert))}" in text
    # No temporary directory left behind.
    assert sorted(p.name for p in cert.parent.iterdir()) == ["tls.crt", "tls.key"]
    tls.server_context(cert, key)  # loads


def test_an_existing_pair_is_kept_and_a_loose_key_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    tls.generate(cert, key, SANS, openssl())
    before = cert.read_bytes()
    os.chmod(key, 0o644)
    with caplog.at_level(logging.WARNING):
        assert tls.ensure(cert, key, SANS, openssl()) is False
    assert cert.read_bytes() == before
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "readable by others" in caplog.text


@pytest.mark.parametrize("present", ["tls.crt", "tls.key"])
def test_half_a_pair_is_refused_not_overwritten(tmp_path: Path, present: str) -> None:
    (tmp_path / present).write_text("the operator's\n")
    with pytest.raises(tls.CertificateUnavailable, match="exists but"):
        tls.ensure(tmp_path / "tls.crt", tmp_path / "tls.key", SANS, openssl())
    assert (tmp_path / present).read_text() == "the operator's\n"


def test_without_openssl_the_gate_serves_loopback_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        gate = tls.open_gate(
            tmp_path / "c", tmp_path / "k", SANS, 5.0, openssl=str(tmp_path / "no-openssl")
        )
    assert gate.context is None
    assert "TLS unavailable" in caplog.text
    assert not (tmp_path / "k").exists()


def test_not_a_certificate_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "c"
    bogus.write_text("hello\n")
    with pytest.raises(tls.CertificateUnavailable, match="no PEM certificate"):
        tls.leaf_der(bogus)


def test_subject_names_and_local_addresses(tmp_path: Path) -> None:
    (tmp_path / "fib_trie").write_text(
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.9.8.7\n        /32 host LOCAL\n"
        "     |-- 10.9.8.255\n        /32 link BROADCAST\n"
        "     |-- 127.0.0.1\n        /32 host LOCAL\n"
    )
    (tmp_path / "if_inet6").write_text(
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fe800000000000000000000000000001 02 40 20 80     eth0\n"
        "fd000000000000000000000000000002 02 40 00 80     eth0\n"
    )
    addresses = tls.local_addresses(tmp_path)
    assert addresses == ["10.9.8.7", "fd00::2"]
    names = tls.subject_names("node1", "0.0.0.0", addresses)
    assert names == [
        "DNS:node1", "DNS:localhost", "IP:127.0.0.1", "IP:::1", "IP:10.9.8.7", "IP:fd00::2",
    ]  # fmt: skip
    # A specific bind address is named; a host name that is not a DNS name is left out.
    assert "IP:192.0.2.5" in tls.subject_names("bad name!", "192.0.2.5", [])
    assert not any("bad" in n for n in tls.subject_names("bad name!", "0.0.0.0", []))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:127.0.0.1", True),
     ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("x", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert tls.is_loopback(host) is loopback


# ---- the CLI side -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "key"),
    [("https://Node1.Example:8443", "node1.example:8443"), ("https://n", "n:443"),
     ("https://[::1]:8080/", "[::1]:8080"), ("https://10.0.0.1:8080", "10.0.0.1:8080")],
)  # fmt: skip
def test_known_certs_keys(url: str, key: str) -> None:
    assert tls_pinning.Endpoint.of(url).key == key


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080",
            "https://node.example:8080", "https://192.0.2.1"],
)  # fmt: skip
def test_urls_that_keep_the_token_private_are_allowed(url: str) -> None:
    tls_pinning.check_plain_url(url, insecure_http=False)


@pytest.mark.parametrize("url", ["http://192.0.2.1:8080", "http://node.example:8080"])
def test_plain_http_to_a_remote_node_needs_the_opt_out(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        tls_pinning.check_plain_url(url, insecure_http=False)
    assert info.value.exit_code == ExitCode.USAGE
    assert "https://" in (info.value.hint or "")
    tls_pinning.check_plain_url(url, insecure_http=True)


def test_known_certs_record_and_lookup(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "spk-visor" / "known_certs"
    assert tls_pinning.lookup(path, "a:1") is None
    tls_pinning.record(path, "a:1", "AA:BB")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # Hand edits: a comment, a line without a final newline.
    with path.open("a") as f:
        f.write("# b:2 sha256 00:00\nb:2 sha256 cc:dd")
    tls_pinning.record(path, "c:3", "EE:FF")
    assert tls_pinning.lookup(path, "b:2") == tls_pinning.Known("CC:DD", f"{path}:3")
    assert tls_pinning.lookup(path, "c:3") == tls_pinning.Known("EE:FF", f"{path}:4")
    assert tls_pinning.lookup(path, "a:1") == tls_pinning.Known("AA:BB", f"{path}:1")


def test_known_certs_location(tmp_path: Path) -> None:
    assert tls_pinning.known_certs_path({"XDG_CONFIG_HOME": str(tmp_path)}) == (
        tmp_path / "spk-visor" / "known_certs"
    )
    explicit = tmp_path / "mine"
    assert tls_pinning.known_certs_path({"SPK_VISOR_KNOWN_CERTS": str(explicit)}) == explicit


def test_fingerprints_agree_between_daemon_and_cli() -> None:
    der = b"\x30\x03\x02\x01\x01"
    assert tls_pinning.fingerprint(der) == tls.fingerprint(der)
    assert len(tls.fingerprint(der)) == 95
