"""Push throughput over SSH: `exec_stream` (what `ota push` uses) against OpenSSH `scp` of
the same file to the same sshd on 127.0.0.1, plus what each tuning step bought.

    sudo .venv/bin/python -m bench.ota_push     # root: it runs its own sshd

Measured, all into the same temp dir on the same disk, page cache warm for the source:

- anchors: scp (OpenSSH's default cipher; scp speaks SFTP since OpenSSH 9.0), scp -c
  aes128-gcm@openssh.com, `ssh node 'cat > file' < file` (OpenSSH's exec channel, the
  same shape as ours), `ssh node sha256sum < file`, and sha256sum of the file locally (the
  hash alone bounds any verifying sink);
- ours: exec_stream into `cat > file` on the node (the goal: >= 0.7x scp) and into
  `sha256sum` (a verifying sink, checked against the source's digest);
- the tuning ladder (SPK_VISOR_BENCH_PUSH_LADDER=0 skips it), plain paramiko into
  `cat > file`: its defaults (aes128-ctr with hmac-sha2-256, Nagle on, Channel.sendall of
  1 MiB buffers), then + TCP_NODELAY, then + aes128-gcm; exec_stream adds memoryview
  writes (no quadratic re-slicing) on top.

Each figure is the median of SPK_VISOR_BENCH_ROUNDS rounds (3), the commands taking turns
within a round, because this machine is a shared VM whose speed drifts (bench/cli.py does
the same). After each run the file is deleted and `sync` runs, outside the timing, so one
run's writeback does not slow the next. Size: SPK_VISOR_BENCH_PUSH_MIB (1024).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paramiko

from spk_visor.config import SshSpec
from spk_visor.transport import ssh
from spk_visor.transport.ssh_stream import exec_stream
from tests.support.sshd import Sshd, start_sshd

GOAL_RATIO = 0.7
GCM = "aes128-gcm@openssh.com"
TIMEOUT = 60.0
KEX_CIPHER = re.compile(r"kex: client->server cipher: (\S+)")


def run() -> dict[str, object]:
    """Run the benchmark; the figures as a dict (MB/s are 10^6 bytes per second)."""
    if os.geteuid() != 0:
        raise SystemExit("bench.ota_push needs root: it runs its own sshd on 127.0.0.1")
    for command in ("sshd", "scp", "ssh-keygen"):
        if shutil.which(command) is None:
            raise SystemExit(f"bench.ota_push needs {command} (openssh-server, openssh-client)")
    size = int(os.environ.get("SPK_VISOR_BENCH_PUSH_MIB", "1024")) << 20
    rounds = int(os.environ.get("SPK_VISOR_BENCH_ROUNDS", "3"))
    ladder = os.environ.get("SPK_VISOR_BENCH_PUSH_LADDER", "1") != "0"
    with _workdir() as work:
        sshd = start_sshd()
        try:
            with _home(work, sshd):
                return _measure(work, sshd, size, rounds, ladder)
        finally:
            ssh.close_all()
            sshd.stop()


@contextmanager
def _workdir() -> Iterator[Path]:
    # Under /tmp like the sshd fixture: the same disk for the source, scp's and cat's files.
    work = Path(tempfile.mkdtemp(prefix="bench-ota-push-", dir="/tmp"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _home(work: Path, sshd: Sshd) -> Iterator[None]:
    """HOME with ~/.ssh/config and known_hosts for the bench sshd, as an operator has."""
    home = work / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".ssh" / "config").write_text(
        f"Host benchnode\n    HostName 127.0.0.1\n    Port {sshd.port}\n    User root\n"
        f"    IdentityFile {sshd.user_key}\n    IdentitiesOnly yes\n"
    )
    (home / ".ssh" / "known_hosts").write_text(f"{sshd.known_hosts_name} {sshd.host_pub}\n")
    saved = {k: os.environ.get(k) for k in ("HOME", "SSH_AUTH_SOCK")}
    os.environ["HOME"] = str(home)
    os.environ.pop("SSH_AUTH_SOCK", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _make_source(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 24))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


class _Runner:
    def __init__(self, work: Path, sshd: Sshd, size: int) -> None:
        self.work = work
        self.sshd = sshd
        self.size = size
        self.src = work / "source.bin"
        self.dst = work / "landed.bin"
        self.sha256 = _make_source(self.src, size)
        self.ciphers: dict[str, str] = {}
        self.checked: set[str] = set()

    # -- anchors: OpenSSH ------------------------------------------------------------

    def scp(self, name: str, cipher: str | None) -> float:
        argv = [
            "scp", "-v", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.work / 'home' / '.ssh' / 'known_hosts'}",
            "-i", str(self.sshd.user_key), "-P", str(self.sshd.port),
            *(["-c", cipher] if cipher else []),
            str(self.src), f"root@127.0.0.1:{self.dst}",
        ]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"scp failed ({proc.returncode}): {proc.stderr[-2000:]}")
        found = KEX_CIPHER.search(proc.stderr)
        self.ciphers[name] = found.group(1) if found else "?"
        self._check_file(name)
        return elapsed

    def ssh(self, name: str, command: str) -> float:
        """OpenSSH's own exec channel with the file on stdin: what exec_stream does, in C."""
        argv = [
            "ssh", "-v", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.work / 'home' / '.ssh' / 'known_hosts'}",
            "-i", str(self.sshd.user_key), "-p", str(self.sshd.port), "root@127.0.0.1", command,
        ]  # fmt: skip
        with self.src.open("rb") as f:
            started = time.perf_counter()
            proc = subprocess.run(argv, stdin=f, capture_output=True, text=True, check=False)
            elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"ssh failed ({proc.returncode}): {proc.stderr[-2000:]}")
        found = KEX_CIPHER.search(proc.stderr)
        self.ciphers[name] = found.group(1) if found else "?"
        self._check_output(name, command, proc.stdout)
        return elapsed

    def sha256sum_local(self) -> float:
        """No network: how fast the verifying sink's hash alone is on this CPU."""
        started = time.perf_counter()
        proc = subprocess.run(["sha256sum", str(self.src)], capture_output=True, check=True)
        elapsed = time.perf_counter() - started
        self.ciphers["sha256sum_local"] = "(no network)"
        self._check_output("sha256sum_local", "sha256sum", proc.stdout.decode())
        return elapsed

    # -- ours -------------------------------------------------------------------------

    def exec_stream(self, name: str, argv: list[str]) -> float:
        with self.src.open("rb") as f:
            started = time.perf_counter()
            result = exec_stream(
                SshSpec("benchnode"), argv, f, size=self.size, timeout=TIMEOUT, accept_new=False
            )
            elapsed = time.perf_counter() - started
        if result.exit_status != 0:
            raise SystemExit(f"{argv}: exit {result.exit_status}: {result.stderr[-2000:]!r}")
        self.ciphers[name] = _pooled_cipher()
        self._check_output(name, argv[0], result.stdout.decode())
        return elapsed

    # -- the tuning ladder: plain paramiko ----------------------------------------------

    def plain(self, name: str, *, nodelay: bool, cipher: str | None) -> float:
        """paramiko as a first attempt would use it, plus the given tuning."""

        def factory(sock: Any, /, **kwargs: Any) -> paramiko.Transport:
            if nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = paramiko.Transport(sock, **kwargs)
            if cipher:
                options = transport.get_security_options()
                options.ciphers = [cipher, *(c for c in options.ciphers if c != cipher)]
            return transport

        client = paramiko.SSHClient()
        client.get_host_keys().add(
            self.sshd.known_hosts_name,
            "ssh-ed25519",
            paramiko.Ed25519Key.from_private_key_file(str(self.sshd.host_key)),
        )
        client.connect(
            "127.0.0.1",
            port=self.sshd.port,
            username="root",
            key_filename=str(self.sshd.user_key),
            allow_agent=False,
            look_for_keys=False,
            timeout=TIMEOUT,
            transport_factory=factory,
        )
        try:
            transport = client.get_transport()
            assert transport is not None
            channel = transport.open_session()
            channel.exec_command(f"cat > {self.dst}")
            started = time.perf_counter()
            with self.src.open("rb") as f:
                while block := f.read(1 << 20):
                    channel.sendall(block)
            channel.shutdown_write()
            status = channel.recv_exit_status()
            elapsed = time.perf_counter() - started
            self.ciphers[name] = transport.local_cipher
        finally:
            client.close()
        if status != 0:
            raise SystemExit(f"{name}: cat exited {status}")
        self._check_file(name)
        return elapsed

    def _check_output(self, name: str, command: str, stdout: str) -> None:
        if not command.startswith("sha256sum"):
            self._check_file(name)
        elif stdout.split()[:1] != [self.sha256]:
            raise SystemExit(f"{name}: sha256sum disagrees with the source's digest")

    def _check_file(self, name: str) -> None:
        """The landed file has the right size; its digest is checked once per method."""
        if self.dst.stat().st_size != self.size:
            raise SystemExit(f"{name}: landed {self.dst.stat().st_size} of {self.size} bytes")
        if name not in self.checked:
            with self.dst.open("rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != self.sha256:
                    raise SystemExit(f"{name}: the landed file differs from the source")
            self.checked.add(name)

    def settle(self) -> None:
        """Outside the timing: drop the landed file and write back dirty pages."""
        self.dst.unlink(missing_ok=True)
        os.sync()


def _pooled_cipher() -> str:
    with ssh._pool_lock:  # the bench reads the pool to report what was negotiated
        shared = list(ssh._pool.values())
    transport = shared[0].client.get_transport() if shared else None
    return transport.local_cipher if transport is not None else "?"


def _measure(work: Path, sshd: Sshd, size: int, rounds: int, ladder: bool) -> dict[str, object]:
    r = _Runner(work, sshd, size)
    cat = f"cat > {r.dst}"
    methods: dict[str, Callable[[], float]] = {
        # anchors: OpenSSH (scp speaks SFTP since OpenSSH 9.0) and the hash alone
        "scp": lambda: r.scp("scp", None),
        "scp_gcm": lambda: r.scp("scp_gcm", GCM),
        "ssh_cat": lambda: r.ssh("ssh_cat", cat),
        "ssh_sha256sum": lambda: r.ssh("ssh_sha256sum", "sha256sum"),
        "sha256sum_local": r.sha256sum_local,
        # ours
        "exec_stream_cat": lambda: r.exec_stream("exec_stream_cat", ["sh", "-c", cat]),
        "exec_stream_sha256sum": lambda: r.exec_stream("exec_stream_sha256sum", ["sha256sum"]),
    }
    if ladder:
        methods |= {
            "paramiko_default": lambda: r.plain("paramiko_default", nodelay=False, cipher=None),
            "paramiko_nodelay": lambda: r.plain("paramiko_nodelay", nodelay=True, cipher=None),
            "paramiko_nodelay_gcm": lambda: r.plain(
                "paramiko_nodelay_gcm", nodelay=True, cipher=GCM
            ),
        }
    load_before = os.getloadavg()[0]
    with r.src.open("rb") as f:  # warm the page cache: every method reads it from memory
        while f.read(1 << 24):
            pass
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            r.settle()
            samples[name].append(size / method() / 1e6)
    r.settle()
    mbs = {name: round(statistics.median(s), 1) for name, s in samples.items()}
    ratio = mbs["exec_stream_cat"] / mbs["scp"]
    gain = mbs["exec_stream_cat"] / mbs["paramiko_default"] if ladder else None
    return {
        "size_mib": size >> 20,
        "rounds": rounds,
        "mb_per_s": mbs,
        "mb_per_s_all": {name: [round(x, 1) for x in s] for name, s in samples.items()},
        "ciphers": dict(r.ciphers),
        "ratio_exec_stream_cat_vs_scp": round(ratio, 2),
        "ratio_exec_stream_cat_vs_scp_gcm": round(mbs["exec_stream_cat"] / mbs["scp_gcm"], 2),
        "ratio_exec_stream_cat_vs_ssh_cat": round(mbs["exec_stream_cat"] / mbs["ssh_cat"], 2),
        "ratio_exec_stream_sha256sum_vs_ssh_sha256sum": round(
            mbs["exec_stream_sha256sum"] / mbs["ssh_sha256sum"], 2
        ),
        "tuning_gain_vs_paramiko_default": round(gain, 2) if gain else None,
        "goal_ratio": GOAL_RATIO,
        "meets_goal": ratio >= GOAL_RATIO,
        "cpus": os.cpu_count(),
        # This is a shared VM: the 1-minute load average says how busy it was around us.
        "load_avg_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def _print(doc: dict[str, object]) -> None:
    mbs = doc["mb_per_s"]
    ciphers = doc["ciphers"]
    assert isinstance(mbs, dict) and isinstance(ciphers, dict)
    print(f"push over SSH, {doc['size_mib']} MiB, median of {doc['rounds']} rounds, MB/s:")
    for name, value in mbs.items():
        print(f"  {name:24s} {value:8.1f}   {ciphers.get(name, '?')}")
    print(
        f"exec_stream cat / scp: {doc['ratio_exec_stream_cat_vs_scp']}x "
        f"(goal >= {doc['goal_ratio']}x: {'met' if doc['meets_goal'] else 'NOT met'}); "
        f"/ scp aes128-gcm: {doc['ratio_exec_stream_cat_vs_scp_gcm']}x; "
        f"/ ssh cat: {doc['ratio_exec_stream_cat_vs_ssh_cat']}x"
    )
    print(
        f"sha256sum sink / ssh sha256sum: {doc['ratio_exec_stream_sha256sum_vs_ssh_sha256sum']}x; "
        f"all tuning vs paramiko defaults: {doc['tuning_gain_vs_paramiko_default']}x; "
        f"load average before/after: {doc['load_avg_before_after']}"
    )


if __name__ == "__main__":
    result = run()
    _print(result)
    sys.exit(0)
