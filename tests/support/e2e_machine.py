"""QEMU machines for the end-to-end test: a blank one booted from the Deploy Shim ISO, and
the installed node booted from its own disk.

QEMU runs under TCG (no KVM needed). Each machine's first NIC is on QEMU's user network
with restrict=on (nothing leaves the QEMU process) and host ports forwarded on 127.0.0.1:
the shim's receiver port, or the node's SSH (22) and HTTPS (8080). `lan` adds a NIC on a
virtual LAN shared by the machines of one test (tests/support/e2e_lan.py). Every QEMU
process is ended by its own PID.

`Node` is what later steps build on: its ports, disk, serial log, `boot()`, `reboot()`,
`power_cycle()`, `stop()`, `ssh()` and `cli()` (spk-visor --ssh from a private HOME that
holds the admin's key).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.support import e2e_release
from tests.support.e2e_lan import Lan

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SMP = 2
MEM_MIB = 1024
DISK_BYTES = 4 << 30
DISK_SERIAL = "E2E-DISK-1"
RECEIVER_PORT = 47475
# The receiver's screen line: the code the operator types on the donor.
CODE_LINE = re.compile(r"deploy code:\s+(\d{2,4}-[0-9A-HJKMNP-TV-Z]{5})\s")
PANIC = re.compile(r"Kernel panic")
# Generous: QEMU TCG on a shared 2-core machine.
SHIM_BOOT_TIMEOUT_S = 420
INSTALL_TIMEOUT_S = 600
PEER_INSTALL_TIMEOUT_S = 900
FIRST_BOOT_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def blank_disk(path: Path, size: int = DISK_BYTES) -> Path:
    """A sparse raw file: no partition table, no filesystem, as a new machine's disk."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


class Qemu:
    """One QEMU process, its serial console in a file."""

    def __init__(self, argv: list[str], log: Path, workdir: Path) -> None:
        self.argv = argv
        self.log = log
        self.workdir = workdir
        self.started = time.monotonic()
        log.unlink(missing_ok=True)
        self.stderr = (workdir / f"{log.stem}.qemu-stderr").open("wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, pattern: re.Pattern[str], timeout: float, since: int = 0) -> re.Match[str]:
        """The first match of `pattern` on the console after offset `since`; fails on a
        panic, QEMU's exit or the timeout, with the console's tail."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            found = pattern.search(text, since)
            if found:
                return found
            if PANIC.search(text, since) or not self.alive() or time.monotonic() > deadline:
                why = (
                    "a panic"
                    if PANIC.search(text, since)
                    else (f"QEMU exited {self.proc.returncode}" if not self.alive() else "timeout")
                )
                raise AssertionError(
                    f"{pattern.pattern!r} not on the console ({why}, "
                    f"{time.monotonic() - self.started:.0f} s):\n{text[-4000:]}"
                    f"\n{self.stderr_text()}"
                )  # fmt: skip
            time.sleep(0.5)

    def stderr_text(self) -> str:
        path = self.workdir / f"{self.log.stem}.qemu-stderr"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by its PID
        self.proc.wait(timeout=60)
        self.stderr.close()


def _base_argv(log: Path, *, smp: int = SMP, mem_mib: int = MEM_MIB) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35",
        "-smp", str(smp), "-m", str(mem_mib),
        "-nographic", "-monitor", "none", "-serial", f"file:{log}",
    ]  # fmt: skip


def _firmware_args(firmware: str, workdir: Path) -> list[str]:
    if firmware == "seabios":
        return []
    if firmware != "ovmf":
        raise ValueError(firmware)
    # A machine's own NVRAM: copied once, kept across its boots (as a real board keeps it).
    nvram = workdir / "OVMF_VARS.fd"
    if not nvram.exists():
        shutil.copyfile(OVMF_VARS, nvram)
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={nvram}",
    ]  # fmt: skip


def _disk_args(disk: Path, serial: str) -> list[str]:
    return [
        "-drive", f"file={disk},format=raw,if=none,id=disk0,cache=unsafe",
        "-device", f"virtio-blk-pci,drive=disk0,serial={serial}",
    ]  # fmt: skip


def boot_shim(iso: Path, disk: Path, workdir: Path, *, receiver_port: int | None,
              lan: Lan | None = None, mac: str = "52:54:00:e2:e0:02",
              firmware: str = "seabios") -> Qemu:  # fmt: skip
    """A blank machine booting the shim ISO. With `receiver_port`, its NIC is on QEMU's
    user network with the receiver forwarded there from the host; with `lan`, a NIC on that
    LAN (and no other, when there is no `receiver_port`). -no-reboot: the receiver's reboot
    after a deploy ends QEMU, and the caller boots the disk in a new process."""
    log = workdir / "shim-serial.log"
    nics: list[str] = []
    if receiver_port is not None:
        fwd = f"hostfwd=tcp:127.0.0.1:{receiver_port}-:{RECEIVER_PORT}"
        nics += ["-netdev", f"user,id=n0,restrict=on,{fwd}", "-device", "virtio-net-pci,netdev=n0"]
    if lan is not None:
        nics += lan.member_args(mac)
    argv = [
        *_base_argv(log), "-no-reboot", *_firmware_args(firmware, workdir),
        "-cdrom", str(iso), "-boot", "order=dc", *_disk_args(disk, DISK_SERIAL), *nics,
    ]  # fmt: skip
    return Qemu(argv, log, workdir)


def read_code(shim: Qemu) -> str:
    """The code as the operator reads it from the target's screen (its serial console)."""
    return shim.wait_for(CODE_LINE, SHIM_BOOT_TIMEOUT_S).group(1)


def admin_key(home: Path) -> Path:
    """A fresh ed25519 key at HOME/.ssh/id_ed25519 (and .pub): the admin's own key, which
    spk-visor's SSH transport finds by OpenSSH's default names."""
    ssh = home / ".ssh"
    ssh.mkdir(parents=True, mode=0o700, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = ssh / "id_ed25519"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    (ssh / "id_ed25519.pub").write_bytes(public + b" admin@e2e\n")
    return ssh / "id_ed25519.pub"


def https_get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    """GET https://127.0.0.1:PORT/PATH. The node's certificate is the one it made at its
    first start; this checks the handshake and the answer, not the chain (the CLI's own
    pinning is tested elsewhere)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(
        f"https://127.0.0.1:{port}{path}", timeout=timeout, context=context
    ) as r:
        return int(r.status), r.read()


def health(port: int) -> dict[str, Any] | None:
    try:
        status, body = https_get(port, "/api/health", timeout=5)
        doc: dict[str, Any] = json.loads(body)
        return doc if status == 200 else None
    except (OSError, ValueError):
        return None


@dataclass
class Node:
    """The installed machine: its disk, forwarded ports and console, booted on demand."""

    workdir: Path
    disk: Path
    home: Path  # HOME for spk-visor --ssh: the admin key, known_hosts
    releases: Path  # the signed bundles the test made (v1.0.0.spkb, ...)
    firmware: str = "seabios"
    smp: int = SMP
    mem_mib: int = MEM_MIB
    lan: Lan | None = None
    mac: str = "52:54:00:e2:e0:01"
    ssh_port: int = field(default_factory=free_port)
    https_port: int = field(default_factory=free_port)
    qemu: Qemu | None = None
    boots: int = 0

    @property
    def serial_log(self) -> Path:
        assert self.qemu is not None, "not booted"
        return self.qemu.log

    @property
    def ssh_target(self) -> str:
        return f"root@127.0.0.1:{self.ssh_port}"

    def boot(self, firmware: str | None = None) -> Qemu:
        """Power on (a new QEMU process, a new console log); does not wait."""
        assert self.qemu is None or not self.qemu.alive(), "already running"
        self.firmware = firmware or self.firmware
        self.boots += 1
        log = self.workdir / f"node-serial-{self.boots}-{self.firmware}.log"
        fwd = (
            f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,"
            f"hostfwd=tcp:127.0.0.1:{self.https_port}-:8080"
        )
        argv = [
            *_base_argv(log, smp=self.smp, mem_mib=self.mem_mib),
            *_firmware_args(self.firmware, self.workdir),
            *_disk_args(self.disk, DISK_SERIAL),
            "-netdev", f"user,id=n0,restrict=on,{fwd}", "-device", "virtio-net-pci,netdev=n0",
            *(self.lan.member_args(self.mac) if self.lan else []),
        ]  # fmt: skip
        self.qemu = Qemu(argv, log, self.workdir)
        return self.qemu

    def wait_healthy(self, timeout: float = 600, since: int = 0) -> dict[str, Any]:
        """Until /api/health answers ok through the forwarded port and sshd answers
        (after the console shows smechvisord starting past `since`, so a reboot is not
        mistaken for up)."""
        assert self.qemu is not None
        self.qemu.wait_for(re.compile(r"Starting smechvisord"), timeout, since)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = health(self.https_port)
            if doc is not None and doc.get("status") == "ok" and self._ssh_banner():
                return doc
            if not self.qemu.alive():
                break
            time.sleep(1)
        raise AssertionError(f"no healthy /api/health in {timeout:.0f} s:\n"
                             f"{self.qemu.text()[-4000:]}")  # fmt: skip

    def _ssh_banner(self) -> bool:
        """sshd answers through the forwarded port (the next step logs in)."""
        try:
            with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=3) as s:
                s.settimeout(10)
                return s.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def stop(self) -> None:
        if self.qemu is not None:
            self.qemu.stop()

    def power_cycle(self, firmware: str | None = None) -> dict[str, Any]:
        """Pull the plug and boot again (optionally with the other firmware)."""
        self.stop()
        self.boot(firmware)
        return self.wait_healthy()

    def request_reboot(self) -> None:
        """`reboot` on the node, detached and a second later: the SSH session ends before
        the guest goes down (the user network would otherwise keep it hanging)."""
        self.ssh("nohup sh -c 'sleep 1; reboot' >/dev/null 2>&1 &", check=False)

    def console_offset(self) -> int:
        """Where the console log ends now: what is printed after it is a later boot's."""
        assert self.qemu is not None, "not booted"
        return len(self.qemu.text())

    def reboot(self, timeout: float = 600, *, expect: re.Pattern[str] | None = None
               ) -> dict[str, Any]:  # fmt: skip
        """A clean reboot from inside (`reboot` over SSH), in the same QEMU process; back
        when the daemon answers again (after `expect` shows on the console, if given)."""
        assert self.qemu is not None
        since = self.console_offset()
        self.request_reboot()
        if expect is not None:
            since = self.qemu.wait_for(expect, timeout, since).end()
        return self.wait_healthy(timeout, since=since)

    def ssh(
        self, command: str, *, check: bool = True, timeout: float = 120
    ) -> tuple[int, str, str]:
        """Run `command` on the node as root with the admin key (paramiko, the node's host
        key as recorded by `spk-visor --accept-new` in HOME)."""
        client = paramiko.SSHClient()
        known_hosts = self.home / ".ssh" / "known_hosts"
        assert known_hosts.is_file(), "no known host key yet: run cli(..., accept_new=True)"
        client.load_host_keys(str(known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            "127.0.0.1", port=self.ssh_port, username="root",
            key_filename=str(self.home / ".ssh" / "id_ed25519"),
            allow_agent=False, look_for_keys=False, timeout=30, banner_timeout=60,
            auth_timeout=60,
        )  # fmt: skip
        try:
            _, out, err = client.exec_command(command, timeout=timeout)
            rc = out.channel.recv_exit_status()
            result = (rc, out.read().decode(errors="replace"), err.read().decode(errors="replace"))
        finally:
            client.close()
        if check and result[0] != 0:
            raise AssertionError(f"{command!r} on the node exited {result[0]}: {result[2]}")
        return result

    def cli(self, *args: str, check: bool = True, timeout: float = 300,
            accept_new: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """`spk-visor --ssh root@127.0.0.1:PORT [--accept-new] ARGS` as the admin."""
        head = ["--ssh", self.ssh_target, *(["--accept-new"] if accept_new else [])]
        return e2e_release.cli(*head, *args, check=check, timeout=timeout, env=self.env())

    def env(self) -> dict[str, str | None]:
        # No SSH_AUTH_SOCK: the host's agent, if any, has no say; only HOME's key counts.
        return {"HOME": str(self.home), "SSH_AUTH_SOCK": None}


@dataclass
class Chain:
    work: Path
    pki: e2e_release.Pki
    image: dict[str, Any]
    iso: Path
    releases: dict[str, e2e_release.Release]
    admin_pub: Path
    node: Node
    timings: e2e_release.Timings
    lan: Lan
    deploy: dict[str, Any] = field(default_factory=dict)
