"""`spk-visor` over SSH, against a real OpenSSH sshd on 127.0.0.1 and the real daemon bound
to 127.0.0.1 only: the tunnel, the token read over SFTP, host-key refusals, key auth
without an agent, and the errors people hit (EXAMPLES.md G.32).

The CLI runs in-process (`spk_visor.cli.main`) with HOME pointed at a temp dir whose
~/.ssh/config maps the Host alias `sshnode` to the test sshd, so ssh config handling is
exercised on every test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spk_visor.cli import main
from spk_visor.config import SshSpec, Target
from spk_visor.errors import TransportError
from spk_visor.transport import ssh
from tests.support.daemon import Daemon, DaemonEnv
from tests.support.sshd import Sshd, admin_home, fingerprint, free_port, keygen

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sshd: Sshd) -> Path:
    home = admin_home(tmp_path, monkeypatch)
    write_ssh_config(home, sshd, sshd.user_key)
    return home


def write_ssh_config(home: Path, sshd: Sshd, identity: Path) -> None:
    (home / ".ssh" / "config").write_text(
        "Host sshnode\n"
        "    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        "    User root\n"
        f"    IdentityFile {identity}\n"
    )


@pytest.fixture
def nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, daemon: Daemon, daemon_env: DaemonEnv
) -> Path:
    token = daemon_env.token_file
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[nodes.viassh]
ssh = "sshnode"
daemon_port = {daemon.port}
remote_token_file = "{token}"

[nodes.viassh2]
ssh = "sshnode"
daemon_port = {daemon.port}
remote_token_file = "{token}"

[nodes.down]
ssh = "sshnode"
daemon_port = {free_port()}
remote_token_file = "{token}"

[nodes.notoken]
ssh = "sshnode"
daemon_port = {daemon.port}
remote_token_file = "{tmp_path}/no-such-token"

[nodes.asnobody]
ssh = "nobody@sshnode"
daemon_port = {daemon.port}
remote_token_file = "{token}"

[nodes.nowhere]
ssh = "root@nonexistent.invalid"

[groups]
pair = ["viassh", "viassh2"]
"""
    )
    monkeypatch.setenv("SPK_VISOR_CONFIG", str(path))
    return path


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], home: Path, nodes: Path) -> Run:
    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def error_doc(out: str) -> dict[str, object]:
    """The {"error": {...}} document a failed command prints under --json."""
    doc = json.loads(out)
    assert list(doc) == ["error"], doc
    error: dict[str, object] = doc["error"]
    return error


def known_hosts(home: Path) -> Path:
    return home / ".ssh" / "known_hosts"


def trust(home: Path, sshd: Sshd) -> None:
    known_hosts(home).write_text(f"{sshd.known_hosts_name} {sshd.host_pub}\n")


def logins(sshd: Sshd) -> list[str]:
    return re.findall(r"Accepted publickey for (\S+) from 127\.0\.0\.1", sshd.log_text())


def test_node_json_through_the_tunnel_with_the_token_read_over_sftp(
    run: Run, home: Path, sshd: Sshd, daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    # The daemon listens on loopback only: the tunnel is the only way in from outside.
    assert any("listening on http://127.0.0.1:" in line for line in daemon.lines)
    assert not known_hosts(home).exists()

    code, out, err = run("--accept-new", "--node", "viassh", "--json", "node")

    assert code == 0, err
    doc = json.loads(out)
    direct = daemon.get("/api/node").json
    assert doc["hostname"] == direct["hostname"]
    assert doc["cpu_model"] == direct["cpu_model"]
    assert doc["daemon_version"] == direct["daemon_version"]
    # No --token and no SPK_VISOR_TOKEN: /api/node needs the token, which came over SFTP.
    assert logins(sshd) == ["root"]
    # The key was recorded, OpenSSH's [host]:port form, in a private file.
    assert known_hosts(home).read_text() == f"{sshd.known_hosts_name} {sshd.host_pub}\n"
    assert known_hosts(home).stat().st_mode & 0o777 == 0o600
    assert (home / ".ssh").stat().st_mode & 0o777 == 0o700
    assert any(sshd.host_fingerprint in r.getMessage() for r in caplog.records)

    # Now known: a fresh connection needs no --accept-new.
    ssh.close_all()
    code, out, err = run("--node", "viassh", "--json", "node")
    assert code == 0, err
    assert json.loads(out)["hostname"] == direct["hostname"]


def test_unknown_host_key_is_refused_without_accept_new(run: Run, home: Path, sshd: Sshd) -> None:
    code, out, err = run("--node", "viassh", "--json", "node")

    assert code == 3
    assert error_doc(out)["exit_code"] == code  # --json: the failure as JSON
    lines = err.splitlines()
    assert lines[0] == (
        f"spk-visor: error: ssh://root@127.0.0.1:{sshd.port}: unknown host key for "
        f"{sshd.known_hosts_name}: ssh-ed25519 {sshd.host_fingerprint}"
    )
    assert "--accept-new" in lines[1]
    assert not known_hosts(home).exists()
    assert logins(sshd) == []  # nothing was offered to an unverified server


@pytest.mark.parametrize("hashed", [False, True])
def test_changed_host_key_is_refused_even_with_accept_new(
    run: Run, home: Path, sshd: Sshd, tmp_path: Path, hashed: bool
) -> None:
    impostor = keygen(tmp_path / "other_host_key")
    pub = " ".join(Path(f"{impostor}.pub").read_text().split()[:2])
    known_hosts(home).write_text(f"# pinned\n{sshd.known_hosts_name} {pub}\n")
    if hashed:  # the line to check is found by its hash too
        subprocess.run(
            ["ssh-keygen", "-H", "-f", str(known_hosts(home))], check=True, capture_output=True
        )
        assert known_hosts(home).read_text().splitlines()[1].startswith("|1|")
    before = known_hosts(home).read_bytes()

    for extra in ([], ["--accept-new"]):
        code, out, err = run(*extra, "--node", "viassh", "--json", "node")
        assert code == 3, err
        assert error_doc(out)["exit_code"] == code  # --json: the failure as JSON
        first = err.splitlines()[0]
        assert first == (
            f"spk-visor: error: ssh://root@127.0.0.1:{sshd.port}: the host key of "
            f"{sshd.known_hosts_name} has CHANGED: known_hosts has ssh-ed25519 "
            f"{fingerprint(Path(f'{impostor}.pub'))}, the server offered ssh-ed25519 "
            f"{sshd.host_fingerprint}"
        )
        assert f"{known_hosts(home)}:2" in err  # the line to check
        assert "--accept-new never replaces" in err
        assert known_hosts(home).read_bytes() == before
    assert logins(sshd) == []


def test_key_auth_works_without_an_agent(run: Run, home: Path, sshd: Sshd) -> None:
    assert "SSH_AUTH_SOCK" not in os.environ
    trust(home, sshd)

    code, out, err = run("--node", "viassh", "--json", "node")

    assert code == 0, err
    assert "cpu_model" in json.loads(out)
    key_fp = fingerprint(Path(f"{sshd.user_key}.pub"))
    assert re.search(rf"Accepted publickey for root .*ED25519 {re.escape(key_fp)}", sshd.log_text())


@pytest.mark.parametrize(
    ("kind", "outcome"),
    [
        ("wrong", "refused"),
        ("encrypted", "encrypted; load it into ssh-agent (ssh-add)"),
        ("missing", "no such file"),
    ],
)
def test_login_failure_says_what_was_tried(
    run: Run, home: Path, sshd: Sshd, tmp_path: Path, kind: str, outcome: str
) -> None:
    key = tmp_path / f"{kind}_key"
    if kind == "wrong":
        keygen(key)
    elif kind == "encrypted":
        keygen(key, passphrase="not-in-any-agent")
    write_ssh_config(home, sshd, key)
    trust(home, sshd)

    code, out, err = run("--node", "viassh", "--json", "node")

    assert code == 2, err
    assert error_doc(out)["exit_code"] == code  # --json: the failure as JSON
    first = err.splitlines()[0]
    assert first == (
        f"spk-visor: error: SSH login refused for root@127.0.0.1:{sshd.port} (public key); "
        f"tried: {key} (IdentityFile) -> {outcome}; "
        "ssh-agent: none (SSH_AUTH_SOCK is not set)"
    )
    assert "authorized_keys" in err
    assert logins(sshd) == []


def test_daemon_not_running_on_the_nodes_port(
    run: Run, home: Path, sshd: Sshd, nodes: Path
) -> None:
    port = re.search(r"\[nodes\.down\][^\[]*daemon_port = (\d+)", nodes.read_text())
    assert port is not None

    code, out, err = run("--accept-new", "--node", "down", "--json", "node")

    assert code == 7
    assert error_doc(out)["exit_code"] == code  # --json: the failure as JSON
    assert err.splitlines() == [
        f"spk-visor: error: connection refused at 127.0.0.1:{port.group(1)} on 127.0.0.1 "
        "(through SSH)",
        "is the service running? rc-service smechvisord status",
    ]
    assert logins(sshd) == ["root"]  # SSH itself worked


def test_unresolvable_host_name(run: Run) -> None:
    code, out, err = run("--accept-new", "--node", "nowhere", "--json", "node")

    assert code == 7
    assert error_doc(out)["exit_code"] == code  # --json: the failure as JSON
    assert err.startswith("spk-visor: error: cannot resolve nonexistent.invalid: ")
    assert "check the node's name" in err


def test_token_the_ssh_user_cannot_read(
    run: Run, home: Path, sshd: Sshd, daemon_env: DaemonEnv
) -> None:
    trust(home, sshd)

    code, out, err = run("--node", "asnobody", "--json", "node")

    assert code == 2
    assert error_doc(out)["exit_code"] == code  # --json: the failure as JSON
    assert err.splitlines()[0] == (
        f"spk-visor: error: ssh://nobody@127.0.0.1:{sshd.port}: cannot read the node's token "
        f"{daemon_env.token_file}: permission denied for SSH user nobody"
    )
    assert "root on the node" in err and "--token" in err
    assert logins(sshd) == ["nobody"]


def test_missing_remote_token_names_where_it_was_looked_for(
    run: Run, home: Path, sshd: Sshd, tmp_path: Path
) -> None:
    trust(home, sshd)

    code, out, err = run("--node", "notoken", "--json", "node")

    assert code == 2
    assert error_doc(out)["exit_code"] == code  # --json: the failure as JSON
    assert err.splitlines()[0] == (
        f"spk-visor: error: ssh://root@127.0.0.1:{sshd.port}: no API token found (token "
        f"looked for in: --token, SPK_VISOR_TOKEN, {tmp_path}/no-such-token on the node (SFTP))"
    )


def test_a_fleet_on_one_host_shares_one_ssh_connection(run: Run, home: Path, sshd: Sshd) -> None:
    trust(home, sshd)

    code, out, err = run("--fleet", "pair", "--json", "node")

    assert code == 0, err
    doc = json.loads(out)
    assert sorted(doc) == ["viassh", "viassh2"]
    assert all("cpu_model" in d for d in doc.values())
    # Two nodes, two token reads, two requests: one SSH login.
    assert logins(sshd) == ["root"]


def test_close_leaves_a_shared_connection_to_its_other_users(
    home: Path, sshd: Sshd, daemon: Daemon
) -> None:
    trust(home, sshd)
    target = Target(name="sshnode", ssh=SshSpec("sshnode"), daemon_port=daemon.port)
    first = ssh.SshTransport(target, timeout=10)
    second = ssh.SshTransport(target, timeout=10)
    try:
        assert first.request("GET", "/api/health").status == 200
        assert second.request("GET", "/api/health").status == 200
        first.close()
        reply = second.request("GET", "/api/health")
        assert reply.status == 200
        assert json.loads(reply.body)["status"] == "ok"
    finally:
        second.close()
    assert logins(sshd) == ["root"]


def test_accept_new_creates_a_private_ssh_dir(
    run: Run, sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = tmp_path / "bare-home"  # no ~/.ssh at all: no config, no keys, no known_hosts
    bare.mkdir()
    monkeypatch.setenv("HOME", str(bare))

    code, out, err = run("--accept-new", "--ssh", f"root@127.0.0.1:{sshd.port}", "node")

    # The host key is recorded before login; the login then has nothing to offer.
    assert code == 2
    assert out == ""
    assert err.splitlines()[0] == (
        f"spk-visor: error: SSH login refused for root@127.0.0.1:{sshd.port} (public key); "
        "tried: ssh-agent: none (SSH_AUTH_SOCK is not set); "
        f"no default key in {bare}/.ssh (id_ed25519, ...)"
    )
    assert (bare / ".ssh").stat().st_mode & 0o777 == 0o700
    kh = bare / ".ssh" / "known_hosts"
    assert kh.stat().st_mode & 0o777 == 0o600
    assert kh.read_text() == f"{sshd.known_hosts_name} {sshd.host_pub}\n"


def test_a_port_where_no_ssh_server_answers(run: Run) -> None:
    with socket.socket() as silent:  # accepts (the kernel's backlog) but never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]

        code, out, err = run("--timeout", "1", "--ssh", f"root@127.0.0.1:{port}", "node")

    assert code == 7
    assert out == ""
    assert err.splitlines() == [
        f"spk-visor: error: no SSH server answered at ssh://root@127.0.0.1:{port} within 1 s",
        "is that port sshd's? check the address and port; raise --timeout",
    ]


@pytest.mark.parametrize("also_trusted", [False, True])
def test_a_revoked_host_key_is_refused(
    run: Run, home: Path, sshd: Sshd, also_trusted: bool
) -> None:
    lines = [f"@revoked * {sshd.host_pub}"]
    if also_trusted:
        lines.append(f"{sshd.known_hosts_name} {sshd.host_pub}")
    known_hosts(home).write_text("\n".join(lines) + "\n")
    before = known_hosts(home).read_bytes()

    code, out, err = run("--accept-new", "--node", "viassh", "--json", "node")

    assert code == 3, err
    assert error_doc(out)["exit_code"] == code  # --json: the failure as JSON
    assert err.splitlines()[0] == (
        f"spk-visor: error: ssh://root@127.0.0.1:{sshd.port}: the host key ssh-ed25519 "
        f"{sshd.host_fingerprint} is REVOKED ({known_hosts(home)}:1)"
    )
    assert known_hosts(home).read_bytes() == before
    assert logins(sshd) == []


def test_hashed_known_hosts_and_marker_lines_are_understood(
    run: Run, home: Path, sshd: Sshd, tmp_path: Path
) -> None:
    # Debian's ssh_config hashes known_hosts names (HashKnownHosts yes); CA lines are
    # common on managed workstations. Neither may break the file for us.
    ca = keygen(tmp_path / "ca_key")
    ca_pub = " ".join(Path(f"{ca}.pub").read_text().split()[:2])
    known_hosts(home).write_text(
        f"@cert-authority *.example.com {ca_pub}\n{sshd.known_hosts_name} {sshd.host_pub}\n"
    )
    subprocess.run(
        ["ssh-keygen", "-H", "-f", str(known_hosts(home))], check=True, capture_output=True
    )
    assert sshd.known_hosts_name not in known_hosts(home).read_text()  # really hashed

    code, out, err = run("--node", "viassh", "--json", "node")

    assert code == 0, err
    assert "cpu_model" in json.loads(out)


@contextlib.contextmanager
def fake_daemon(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[int]:
    """A one-connection "daemon" on a loopback port (yielded) that reads the request and
    runs `answer`; the event is set when the test is done with it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(10)
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                answer(conn, stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def ssh_failure(port: int, timeout: float) -> tuple[TransportError, float]:
    """The error of one GET through the tunnel to `port`, and the seconds it took."""
    target = Target(name="sshnode", ssh=SshSpec("sshnode"), daemon_port=port)
    transport = ssh.SshTransport(target, timeout=timeout)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError) as exc:
            transport.request("GET", "/api/health")
    finally:
        transport.close()
    return exc.value, time.monotonic() - started


def test_a_daemon_that_drips_its_answer_through_the_tunnel_is_cut_off_at_the_deadline(
    home: Path, sshd: Sshd
) -> None:
    """The deadline (--timeout) is the request's whole time through SSH too: a daemon
    that sends its answer a byte every 0.1 s is cut off at 1 s, not read for 30."""
    trust(home, sshd)

    def drip(conn: socket.socket, stop: threading.Event) -> None:
        body = b'{"status": "ok"}' * 20
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        for byte in head.encode() + b"\r\n\r\n" + body:
            if stop.is_set():
                return
            conn.sendall(bytes([byte]))
            time.sleep(0.1)

    with fake_daemon(drip) as port:
        error, elapsed = ssh_failure(port, timeout=1)
    assert error.message.startswith(f"no answer from 127.0.0.1:{port} on 127.0.0.1")
    assert error.message.endswith("within 1 s")
    assert elapsed < 5, f"a 1 s deadline took {elapsed:.1f} s"


def test_an_answer_shorter_than_its_content_length_through_the_tunnel_is_an_error(
    home: Path, sshd: Sshd
) -> None:
    trust(home, sshd)

    def short(conn: socket.socket, _stop: threading.Event) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 90\r\n"
            b'\r\n{"status": "ok"}'
        )

    with fake_daemon(short) as port:
        error, _ = ssh_failure(port, timeout=10)
    assert error.exit_code == 7
    assert error.message.startswith("ssh://")
    assert error.message.endswith(
        ": the daemon's answer through SSH broke off: 16 bytes of 90 received"
    )
