"""Stand-ins the deploy unit tests share: a judged inventory disk, and two ends of a secure
channel over a socketpair (fixed keys: the records are real, the handshake is skipped)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

from spk_visor.deploy.channel import SecureChannel
from spk_visor.deploy.inventory import Disk, judge

GIB = 1 << 30
SERIAL = "S3EVNX0K123456"
K1, K2 = b"\x01" * 32, b"\x02" * 32


def fake_disk(**kw: Any) -> Disk:
    """A 256 GiB SATA disk with serial SERIAL, judged as the receiver would (no loop)."""
    base: dict[str, Any] = {
        "name": "sda",
        "path": "/dev/sda",
        "size": 256 * GIB,
        "logical_sector": 512,
        "physical_sector": 4096,
        "model": "TEST",
        "serial": SERIAL,
        "wwn": "",
        "transport": "sata",
        "rotational": False,
        "removable": False,
        "read_only": False,
        "has_signatures": False,
        "mounted": False,
        "boot_medium": False,
    }
    base.update(kw)
    return judge(Disk(**base), None, allow_loop=False)


@contextlib.contextmanager
def channel_pair(timeout: float) -> Iterator[tuple[SecureChannel, SecureChannel]]:
    """(donor end, target end), closed on exit."""
    a, b = socket.socketpair()
    donor_side = SecureChannel(a, K1, K2, "0000", idle_timeout=timeout)
    target_side = SecureChannel(b, K2, K1, "0000", idle_timeout=timeout)
    try:
        yield donor_side, target_side
    finally:
        donor_side.close()
        target_side.close()
