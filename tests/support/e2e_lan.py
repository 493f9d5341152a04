"""A virtual LAN for QEMU machines, on loopback only: an Ethernet hub with a DHCP server.

Each machine's NIC is QEMU's socket netdev in UDP mode (`-netdev socket,udp=HUB,
localaddr=ME`): every Ethernet frame it sends is one datagram to the hub on 127.0.0.1.
The hub floods each frame to every other member, as a hub does, so broadcasts (DHCP,
deploy discovery) reach every machine, and unicast TCP works between them. Nothing leaves
127.0.0.1 and no host network setting changes (QEMU's multicast mode would need
multicast on the loopback interface).

The LAN's DHCP server lives in the hub: a rack's network has one, and the Deploy Shim and
the node both ask for an address on every wired NIC. It answers DISCOVER and REQUEST with
a fixed address per MAC in 192.168.77.0/24, with no router (the LAN leads nowhere).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Iterator

NETWORK = ipaddress.IPv4Network("192.168.77.0/24")
SERVER = ipaddress.IPv4Address("192.168.77.1")
SERVER_MAC = bytes.fromhex("525400e2e0fe")
BROADCAST_MAC = b"\xff" * 6
LEASE_S = 3600
_MAGIC = b"\x63\x82\x53\x63"
_DISCOVER, _OFFER, _REQUEST, _ACK = 1, 2, 3, 5


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _options(raw: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i < len(raw):
        code = raw[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(raw):
            break
        length = raw[i + 1]
        out[code] = raw[i + 2 : i + 2 + length]
        i += 2 + length
    return out


class Lan:
    """The hub (a thread on a UDP socket) and its members' QEMU arguments."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = int(self.sock.getsockname()[1])
        self.members: set[tuple[str, int]] = set()
        self.leases: dict[bytes, ipaddress.IPv4Address] = {}
        self.frames = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2e-lan-hub", daemon=True)

    def member_args(self, mac: str) -> list[str]:
        """A NIC on this LAN: QEMU's UDP socket netdev, from its own loopback port."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            own = int(s.getsockname()[1])
        # Known before the member speaks: frames for it are flooded from the start.
        self.members.add(("127.0.0.1", own))
        return [
            "-netdev", f"socket,id=lan,udp=127.0.0.1:{self.port},localaddr=127.0.0.1:{own}",
            "-device", f"virtio-net-pci,netdev=lan,mac={mac}",
        ]  # fmt: skip

    def address_of(self, mac: str) -> ipaddress.IPv4Address:
        """The address this LAN's DHCP gives `mac` (fixed by the order of first asking)."""
        key = bytes.fromhex(mac.replace(":", ""))
        if key not in self.leases:
            self.leases[key] = NETWORK.network_address + 10 + len(self.leases)
        return self.leases[key]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, sender = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.frames += 1
            self.members.add(sender)
            for member in list(self.members):
                if member != sender:
                    with contextlib.suppress(OSError):
                        self.sock.sendto(frame, member)
            reply = self._dhcp(frame)
            if reply is not None:
                for member in list(self.members):
                    with contextlib.suppress(OSError):
                        self.sock.sendto(reply, member)

    def _dhcp(self, frame: bytes) -> bytes | None:
        """The server's answer to a DHCP DISCOVER or REQUEST in `frame`, else None."""
        if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00":
            return None
        ip = frame[14:]
        header_len = (ip[0] & 0x0F) * 4
        if ip[9] != 17:
            return None
        udp = ip[header_len:]
        if struct.unpack("!H", udp[2:4])[0] != 67:
            return None
        bootp = udp[8:]
        if bootp[0] != 1 or bootp[236:240] != _MAGIC:
            return None
        options = _options(bootp[240:])
        kind = options.get(53, b"\0")[0]
        if kind not in (_DISCOVER, _REQUEST):
            return None
        xid, chaddr = bootp[4:8], bootp[28:34]
        yiaddr = self.address_of(chaddr.hex(":"))
        answer = _OFFER if kind == _DISCOVER else _ACK
        opts = b"".join(
            bytes([code, len(value)]) + value
            for code, value in (
                (53, bytes([answer])),
                (54, SERVER.packed),
                (51, struct.pack("!I", LEASE_S)),
                (1, NETWORK.netmask.packed),
                (28, NETWORK.broadcast_address.packed),
            )
        )
        reply = (
            bytes([2, 1, 6, 0]) + xid + b"\0\0" + b"\x80\x00"  # op, htype, hlen, hops, flags
            + b"\0" * 4 + yiaddr.packed + SERVER.packed + b"\0" * 4  # ciaddr yiaddr siaddr gi
            + chaddr + b"\0" * 10 + b"\0" * 192 + _MAGIC + opts + b"\xff"
        )  # fmt: skip
        udp_out = struct.pack("!HHHH", 67, 68, 8 + len(reply), 0) + reply
        ip_out = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp_out), 0, 0, 64, 17, 0,
            SERVER.packed, b"\xff" * 4,
        )  # fmt: skip
        ip_out = ip_out[:10] + struct.pack("!H", _checksum(ip_out)) + ip_out[12:]
        return BROADCAST_MAC + SERVER_MAC + b"\x08\x00" + ip_out + udp_out


@contextlib.contextmanager
def lan() -> Iterator[Lan]:
    hub = Lan()
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
