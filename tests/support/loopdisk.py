"""A sparse file behind a loop device with partition scanning: the deploy target disk
of the tests and of bench/deploy.py. Its serial, as the receiver's inventory names loop
devices, is `loop:<backing file name>`."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path


class LoopDisk:
    def __init__(self, work: Path, size: str) -> None:
        self.file = work / f"spkdisk-{secrets.token_hex(4)}.img"
        subprocess.run(["truncate", "-s", size, str(self.file)], check=True, timeout=10)
        self.dev = subprocess.run(
            ["losetup", "-f", "--show", "-P", str(self.file)],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        self.serial = f"loop:{self.file.name}"

    def part(self, index: int) -> str:
        return f"{self.dev}p{index}"

    def head(self, n: int = 440) -> bytes:
        with open(self.dev, "rb") as f:
            return f.read(n)

    def detach(self) -> None:
        subprocess.run(["losetup", "-d", self.dev], capture_output=True, timeout=30, check=False)
