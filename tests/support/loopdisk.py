"""A sparse file behind a loop device with partition scanning: the deploy target disk
of the tests and of bench/deploy.py. Its serial, as the receiver's inventory names loop
devices, is `loop:<backing file name>`."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

from tests.support.loopattach import attach, detach


class LoopDisk:
    def __init__(self, work: Path, size: str, *, direct_io: bool = False) -> None:
        self.file = work / f"spkdisk-{secrets.token_hex(4)}.img"
        subprocess.run(["truncate", "-s", size, str(self.file)], check=True, timeout=10)
        # direct_io: the loop device reads and writes the file O_DIRECT (loopattach).
        self.dev = attach(self.file, partscan=True, direct_io=direct_io)
        self.serial = f"loop:{self.file.name}"

    def part(self, index: int) -> str:
        return f"{self.dev}p{index}"

    def head(self, n: int = 440) -> bytes:
        with open(self.dev, "rb") as f:
            return f.read(n)

    def detach(self) -> None:
        detach(self.dev)
