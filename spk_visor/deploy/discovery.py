"""The target's UDP announcement and the donor's listener (design/deploy.md, "Discovery
packet").

The datagram carries public, advisory fields only: magic, protocol versions, nameplate,
code epoch, instance_id, TCP port, state and operator hints (MAC, boot mode, shim
version). Nothing derived from the code's secret ever goes in: with ~25 bits any such
value is brute-forced offline in seconds. The donor trusts none of it; the handshake
re-checks epoch and instance_id, and hints are sanitised before anyone prints them.
"""

from __future__ import annotations

import fcntl
import json
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from spk_visor import strict_json
from spk_visor.deploy.channel import DISCOVERY_PORT, PORT, VERSION

MAGIC = "SPKD"
MAX_DATAGRAM = 512
STATES = ("waiting", "busy", "resumable", "done", "failed")
WAIT_INTERVAL = 1.0
BUSY_INTERVAL = 5.0
JITTER = 0.2
_HINT_MAX = 40
_SIOCGIFFLAGS = 0x8913
_SIOCGIFBRDADDR = 0x8919
_IFF_UP = 0x1
_IFF_BROADCAST = 0x2


@dataclass
class Announcement:
    nameplate: str
    epoch: int
    instance_id: str  # 32 hex digits
    port: int
    state: str
    mac: str
    boot_mode: str
    shim_version: str
    address: str  # where the datagram came from (not a field of the packet)
    versions: tuple[int, ...] = (VERSION,)
    first_seen: float = field(default=0.0, compare=False)  # time.time() of the first copy

    @property
    def instance_bytes(self) -> bytes:
        return bytes.fromhex(self.instance_id)


def announcement_bytes(
    nameplate: str,
    epoch: int,
    instance_id: bytes,
    port: int = PORT,
    state: str = "waiting",
    mac: str = "",
    boot_mode: str = "",
    shim_version: str = "",
) -> bytes:
    """The datagram, compact JSON under MAX_DATAGRAM bytes. Takes no code object on purpose:
    the secret is not even in reach here."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, not {state!r}")
    doc = {
        "magic": MAGIC,
        "versions": [VERSION],
        "nameplate": nameplate,
        "epoch": epoch,
        "instance_id": instance_id.hex(),
        "port": port,
        "state": state,
        "mac": _hint(mac),
        "boot_mode": _hint(boot_mode),
        "shim_version": _hint(shim_version),
    }
    data = json.dumps(doc, separators=(",", ":")).encode()
    if len(data) >= MAX_DATAGRAM:
        raise ValueError(f"announcement of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def parse_announcement(data: bytes, address: str) -> Announcement | None:
    """The announcement in `data`, or None for anything malformed, foreign or too big."""
    if len(data) >= MAX_DATAGRAM:
        return None
    try:
        doc = strict_json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
        return None
    try:
        versions = tuple(int(v) for v in doc["versions"] if type(v) is int)
        nameplate = doc["nameplate"]
        epoch = doc["epoch"]
        instance_id = doc["instance_id"]
        port = doc["port"]
        state = doc["state"]
    except (KeyError, TypeError):
        return None
    if VERSION not in versions:
        return None
    if not (isinstance(nameplate, str) and nameplate.isascii() and nameplate.isdigit()):
        return None
    if not 2 <= len(nameplate) <= 4:
        return None
    if type(epoch) is not int or not 0 <= epoch < 2**32:
        return None
    if not (isinstance(instance_id, str) and len(instance_id) == 32):
        return None
    try:
        bytes.fromhex(instance_id)
    except ValueError:
        return None
    if type(port) is not int or not 1 <= port <= 65535:
        return None
    if state not in STATES:
        return None
    return Announcement(
        nameplate=nameplate,
        epoch=epoch,
        instance_id=instance_id.lower(),
        port=port,
        state=state,
        mac=_hint(doc.get("mac")),
        boot_mode=_hint(doc.get("boot_mode")),
        shim_version=_hint(doc.get("shim_version")),
        address=address,
        versions=versions,
        first_seen=time.time(),
    )


def broadcast_addresses() -> list[str]:
    """255.255.255.255 plus each up interface's directed broadcast (ioctl: no iproute2 -j
    in the shim's busybox)."""
    out = ["255.255.255.255"]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, ifname in socket.if_nameindex():
            req = struct.pack("256s", ifname.encode()[:15])
            try:
                flags = struct.unpack_from(
                    "H", fcntl.ioctl(probe.fileno(), _SIOCGIFFLAGS, req), 16
                )[0]
                if not (flags & _IFF_UP and flags & _IFF_BROADCAST):
                    continue
                res = fcntl.ioctl(probe.fileno(), _SIOCGIFBRDADDR, req)
            except OSError:
                continue  # no IPv4 address on this interface
            addr = socket.inet_ntoa(res[20:24])
            if addr not in out and addr != "0.0.0.0":  # noqa: S104 - an address we compare, not bind
                out.append(addr)
    finally:
        probe.close()
    return out


class Announcer:
    """Broadcasts the announcement from a daemon thread: every 1 s +-20 % while waiting,
    every 5 s otherwise. `update()` changes fields and sends at once (a rotation or a
    state change should show up on donors without waiting)."""

    def __init__(
        self,
        nameplate: str,
        epoch: int,
        instance_id: bytes,
        port: int = PORT,
        state: str = "waiting",
        mac: str = "",
        boot_mode: str = "",
        shim_version: str = "",
        *,
        discovery_port: int = DISCOVERY_PORT,
        destinations: list[str] | None = None,
        interval: float = WAIT_INTERVAL,
        busy_interval: float = BUSY_INTERVAL,
        port_udp: int | None = None,
    ) -> None:
        self._fields: dict[str, Any] = {
            "nameplate": nameplate,
            "epoch": epoch,
            "instance_id": instance_id,
            "port": port,
            "state": state,
            "mac": mac,
            "boot_mode": boot_mode,
            "shim_version": shim_version,
        }
        self._packet = announcement_bytes(**self._fields)
        self._fixed_destinations = destinations
        # port_udp: the same as discovery_port, the name the receiver uses.
        self._discovery_port = discovery_port if port_udp is None else port_udp
        self._interval = interval
        self._busy_interval = busy_interval
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self._thread = threading.Thread(target=self._run, name="spk-deploy-announce", daemon=True)
        self._thread.start()

    def update(self, **changes: Any) -> None:
        """Change any announcement field (state=, epoch=, instance_id=, port=, ...)."""
        with self._lock:
            fields = {**self._fields, **changes}
            self._packet = announcement_bytes(**fields)
            self._fields = fields
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                packet = self._packet
                waiting = self._fields["state"] == "waiting"
            # Interfaces come and go (DHCP after STP): recompute the targets every round.
            for dest in self._fixed_destinations or broadcast_addresses():
                try:
                    self._sock.sendto(packet, (dest, self._discovery_port))
                    self.sent += 1
                except OSError as exc:
                    # No route yet (link down, no DHCP lease): keep trying, keep the last few.
                    self.errors = [*self.errors[-9:], f"{dest}: {exc}"]
            base = self._interval if waiting else self._busy_interval
            self._wake.wait(base * random.uniform(1 - JITTER, 1 + JITTER))  # noqa: S311 - jitter, not crypto
            self._wake.clear()


def discover(
    nameplate: str | None,
    port: int = DISCOVERY_PORT,
    timeout: float = 30,
    *,
    settle: float = 3.0,
    bind: str = "",
) -> list[Announcement]:
    """Announcements whose nameplate matches (None: all), newest copy per target, sorted by
    first-seen. Returns `settle` s after the first match (enough for every target to
    announce at 1 s +-20 %), or after `timeout` with what it has (maybe nothing)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Several donors (or a donor and a test) may listen on the same host.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((bind, port))
    found: dict[tuple[str, int, str], Announcement] = {}
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data, (addr, _) = sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                break
            ann = parse_announcement(data, addr)
            if ann is None or (nameplate is not None and ann.nameplate != nameplate):
                continue
            key = (ann.address, ann.port, ann.instance_id)
            if key in found:
                ann.first_seen = found[key].first_seen
            elif not found:
                deadline = min(deadline, time.monotonic() + settle)
            found[key] = ann
    finally:
        sock.close()
    # One entry per machine: a rotation changes instance_id, keep only the newest per address.
    latest: dict[tuple[str, int], Announcement] = {}
    for ann in found.values():
        latest[(ann.address, ann.port)] = ann
    return sorted(latest.values(), key=lambda a: a.first_seen)


def _hint(value: object) -> str:
    """Printable ASCII only, bounded: hints end up on an operator's terminal, and a hostile
    packet must not be able to send it escape sequences."""
    if not isinstance(value, str):
        return ""
    return "".join(ch for ch in value if " " <= ch <= "~")[:_HINT_MAX]
