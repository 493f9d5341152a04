"""The end-to-end test's virtual LAN (tests/support/e2e_lan.py): a hub and its DHCP server,
driven with raw Ethernet frames the way QEMU's socket netdev sends them."""

from __future__ import annotations

import ipaddress
import socket
import struct

from tests.support import e2e_lan

MAC_A = bytes.fromhex("525400aaaa01")


def _member(hub: e2e_lan.Lan) -> socket.socket:
    args = hub.member_args("52:54:00:00:00:01")
    own = int(args[1].rsplit(":", 1)[1])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", own))
    s.settimeout(10)
    return s


def _discover(mac: bytes, kind: int = 1) -> bytes:
    bootp = (
        bytes([1, 1, 6, 0]) + b"\x12\x34\x56\x78" + b"\0" * 4 + b"\0" * 16 + mac + b"\0" * 202
        + b"\x63\x82\x53\x63" + bytes([53, 1, kind, 255])
    )  # fmt: skip
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, b"\0" * 4, b"\xff" * 4
    )
    return b"\xff" * 6 + mac + b"\x08\x00" + ip + udp


def _yiaddr(frame: bytes) -> tuple[int, ipaddress.IPv4Address, int]:
    ip = frame[14:]
    assert ip[9] == 17 and e2e_lan._checksum(ip[:20]) == 0  # a valid IPv4 header
    udp = ip[20:]
    assert struct.unpack("!HH", udp[:4]) == (67, 68)
    bootp = udp[8:]
    options = e2e_lan._options(bootp[240:])
    return bootp[0], ipaddress.IPv4Address(bootp[16:20]), options[53][0]


def test_hub_floods_and_answers_dhcp() -> None:
    with e2e_lan.lan() as hub:
        a, b = _member(hub), _member(hub)
        try:
            frame = _discover(MAC_A)
            a.sendto(frame, ("127.0.0.1", hub.port))
            # b sees a's broadcast as sent, then the server's offer; a sees only the offer.
            assert b.recv(2048) == frame
            op, yiaddr, kind = _yiaddr(b.recv(2048))
            assert (op, yiaddr, kind) == (2, ipaddress.IPv4Address("192.168.77.10"), 2)
            assert _yiaddr(a.recv(2048))[1] == yiaddr
            a.sendto(_discover(MAC_A, kind=3), ("127.0.0.1", hub.port))
            b.recv(2048)
            assert _yiaddr(b.recv(2048)) == (2, yiaddr, 5)  # the same address, ACKed
            assert hub.address_of(MAC_A.hex(":")) == yiaddr
            assert hub.address_of("52:54:00:aa:aa:02") == ipaddress.IPv4Address("192.168.77.11")
        finally:
            a.close()
            b.close()
