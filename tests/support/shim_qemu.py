"""Boot a Deploy Shim ISO in QEMU (TCG) and watch its serial console.

Used by tests/integration/test_shim_iso.py and bench/deploy_iso.py. The guest NIC is on
QEMU's user network with restrict=on: DHCP works, nothing leaves the QEMU process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
READY = re.compile(r"SPK-SHIM ready python=3\.11\.\d+ .*cryptography=")
PANIC = re.compile(r"Kernel panic|SPK-SHIM python: the runtime check failed")


@dataclass
class Boot:
    log: str  # the serial console, as text
    seconds: float  # from starting QEMU to the match
    matched: bool


def boot_iso(iso: Path, workdir: Path, *, uefi: bool, until: re.Pattern[str] = READY,
             timeout: float = 180.0) -> Boot:  # fmt: skip
    """Boot iso as a CD-ROM until `until` shows on serial (or panic, or timeout)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / ("uefi.log" if uefi else "bios.log")
    log.unlink(missing_ok=True)
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-nographic",
            "-monitor", "none", "-serial", f"file:{log}", "-cdrom", str(iso),
            "-netdev", "user,id=n0,restrict=on", "-device", "e1000,netdev=n0"]  # fmt: skip
    if uefi:
        vars_copy = workdir / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]  # fmt: skip
    return watch(argv, log, workdir, until=until, timeout=timeout)


def watch(argv: list[str], log: Path, workdir: Path, *, until: re.Pattern[str],
          timeout: float, while_running: Callable[[str], bool] | None = None,
          ) -> Boot:  # fmt: skip
    """Run QEMU (argv, serial console to `log`) until `until` shows on it, a panic, an
    exit or the timeout. `while_running(text)`, if given, is polled too: True ends the
    wait as a match (a check from the host, such as an HTTP probe)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    text = ""
    try:
        while time.monotonic() - start < timeout:
            text = log.read_text(errors="replace") if log.exists() else ""
            if until.search(text) and (while_running is None or while_running(text)):
                return Boot(text, time.monotonic() - start, True)
            if PANIC.search(text) or proc.poll() is not None:
                break
            time.sleep(0.5)
        text = log.read_text(errors="replace") if log.exists() else ""
        return Boot(
            text, time.monotonic() - start, while_running is None and bool(until.search(text))
        )
    finally:
        proc.kill()  # by our own PID only
        _, err = proc.communicate(timeout=30)
        if err:
            (workdir / "qemu.stderr").write_bytes(err)
