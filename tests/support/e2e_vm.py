"""A QEMU (TCG) machine booting an installed SmechVisor disk, for the end-to-end tests.

The disk file boots through its own boot path (SeaBIOS or OVMF, then GRUB from the disk,
never a direct kernel boot). The guest's NIC is on QEMU's user network with `restrict=on`
(nothing leaves the QEMU process) and two host ports on 127.0.0.1 forwarded to the
guest's SSH (22) and daemon (8080) ports. Each boot writes its own serial log
(`serial-<n>.log`), which the test reads the way an operator reads the console.

QEMU runs with `-no-reboot`: a guest reboot (or power-off) ends the QEMU process, and
`restart()` boots the same disk again, as a firmware reset would. The forwarded ports stay
the same across boots, so the host's known_hosts and pinned certificates still apply.
Everything started here is stopped by its own PID.
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

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
PANIC = re.compile(r"Kernel panic - not syncing")
# Generous: TCG on a loaded 2-core machine boots the full image in about 100 s.
BOOT_TIMEOUT_S = 420.0


class MachineError(AssertionError):
    """The machine did not do what the test waited for; carries the console's tail."""


def free_port() -> int:
    """A port the kernel picked (bound then closed; QEMU binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def https_get_json(port: int, path: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """GET https://127.0.0.1:PORT/PATH as JSON, None when it does not answer.

    Through QEMU's port forward the node sees a peer that is not its loopback, so it
    speaks only TLS; the certificate is the node's own, made at its first start: this
    checks the handshake and the answer, not the chain."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}{path}", timeout=timeout, context=context
        ) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc
    except (OSError, ValueError):
        return None


@dataclass
class Machine:
    """One guest on one disk file; boots counted from 1."""

    disk: Path
    workdir: Path
    firmware: str = "seabios"  # or "ovmf"
    smp: int = 2
    memory_mib: int = 1536
    ssh_port: int = field(default_factory=free_port)
    https_port: int = field(default_factory=free_port)
    boots: int = 0
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    # -- QEMU

    def argv(self) -> list[str]:
        fwd = (
            f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,"
            f"hostfwd=tcp:127.0.0.1:{self.https_port}-:8080"
        )
        argv = [
            *("qemu-system-x86_64", "-accel", "tcg", "-machine", "q35"),
            *("-smp", str(self.smp), "-m", str(self.memory_mib)),
            # No display adapter: the console is the serial port, and a framebuffer's
            # driver costs seconds of every boot under TCG.
            *("-nographic", "-vga", "none", "-monitor", "none", "-no-reboot"),
            *("-serial", f"file:{self.serial_log}"),
            *("-drive", f"file={self.disk},format=raw,if=virtio,cache=unsafe"),
            *("-netdev", f"user,id=n0,restrict=on,{fwd}"),
            *("-device", "virtio-net-pci,netdev=n0"),
        ]
        if self.firmware == "ovmf":
            vars_copy = self.workdir / "OVMF_VARS.fd"
            if not vars_copy.exists():  # one NVRAM per machine, kept across its reboots
                shutil.copyfile(OVMF_VARS, vars_copy)
            argv += [
                *("-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
                *("-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"),
            ]
        return argv

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"serial-{self.boots}.log"

    def start(self) -> None:
        """Power on (a new boot, with its own serial log)."""
        if self.running():
            raise MachineError("the machine is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.boots += 1
        self.serial_log.unlink(missing_ok=True)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / f"qemu-{self.boots}.stderr").open("wb"),
            # Its own session: a signal to the test's process group does not reach it; it
            # is stopped by its PID (stop()).
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Pull the plug (our own QEMU, by its PID)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=60)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- the console

    def console(self, boot: int | None = None) -> str:
        """The serial log of one boot (default: the current one)."""
        path = self.workdir / f"serial-{boot or self.boots}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def consoles(self) -> str:
        """Every boot's console, in order, each after a header line."""
        return "".join(
            f"\n===== boot {n} =====\n{self.console(n)}" for n in range(1, self.boots + 1)
        )

    def fail(self, what: str) -> MachineError:
        return MachineError(f"{what} (boot {self.boots}); console:\n{self.console()[-5000:]}")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = BOOT_TIMEOUT_S) -> str:
        """Wait until `pattern` shows on this boot's console; the match. Fails on a panic,
        on QEMU exiting, or at the timeout."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            found = regex.search(text)
            if found:
                return found.group(0)
            if PANIC.search(text):
                raise self.fail(f"kernel panic while waiting for {regex.pattern!r}")
            if not self.running():
                raise self.fail(f"QEMU exited while waiting for {regex.pattern!r}")
            if time.monotonic() > deadline:
                raise self.fail(f"{regex.pattern!r} not seen in {timeout:.0f} s")
            time.sleep(0.5)

    def wait_healthy(self, timeout: float = BOOT_TIMEOUT_S) -> dict[str, Any]:
        """Wait until the daemon answers /api/health through the forwarded port and SSH
        accepts connections; /api/health's document."""
        deadline = time.monotonic() + timeout
        while True:
            doc = https_get_json(self.https_port, "/api/health", timeout=3)
            if doc is not None and doc.get("status") == "ok" and self._ssh_banner():
                return doc
            if PANIC.search(self.console()):
                raise self.fail("kernel panic while waiting for the node")
            if not self.running():
                raise self.fail("QEMU exited while waiting for the node")
            if time.monotonic() > deadline:
                raise self.fail(f"the node did not answer in {timeout:.0f} s")
            time.sleep(1.0)

    def _ssh_banner(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=3) as s:
                s.settimeout(3)
                return s.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    # -- reboots

    def wait_exit(self, timeout: float = BOOT_TIMEOUT_S) -> float:
        """Wait for the guest to reboot or power off (QEMU exits, -no-reboot); seconds."""
        start = time.monotonic()
        if self.proc is None:
            raise MachineError("the machine was never started")
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"the guest did not reboot in {timeout:.0f} s") from None
        return time.monotonic() - start

    def restart(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        """After the guest rebooted (QEMU exited): boot the same disk again."""
        self.wait_exit(timeout)
        self.start()

    def boot(self, timeout: float = BOOT_TIMEOUT_S) -> dict[str, Any]:
        """Power on and wait until the node serves; /api/health's document."""
        self.start()
        return self.wait_healthy(timeout)
