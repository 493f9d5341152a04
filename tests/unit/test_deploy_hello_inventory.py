"""The receiver takes the HELLO's disk inventory (lsblk and wipefs: process starts, tens of
ms) while the handshake's SPAKE2 runs, not after it; and only an authenticated donor is
sent it. A real Receiver on loopback and the real donor handshake; the inventory is a
stand-in (no root, no disks)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.deploy import channel, guard, inventory, messages, receiver
from spk_visor.trust import roots
from tests.support.ota_pki import Pki

GATE_S = 3.0  # below the target's 10 s handshake timeout
DISK = inventory.Disk(
    name="sdz", path="/dev/sdz", size=1 << 30, logical_sector=512, physical_sector=512,
    model="M", serial="S1", wwn="", transport="sata", rotational=False, removable=False,
    read_only=False, has_signatures=False, mounted=False, boot_medium=False, eligible=True,
)  # fmt: skip


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.inventoried = threading.Event()  # the first inventory after the code showed
        root = roots.load_anchor(Pki().root_env().to_bytes(), "test root")
        options = receiver.Options(
            trust_root=root, mountpoint=tmp_path / "mnt", announce=False, bind="127.0.0.1",
            port=0, policy=guard.Policy(fail_delay=0.0),
        )  # fmt: skip
        self.r = receiver.Receiver(options, self.emit)
        self.thread = threading.Thread(target=self.r.serve, daemon=True)

    def emit(self, event: str, doc: dict[str, Any]) -> None:
        with self.cond:
            self.events.append((event, doc))
            self.cond.notify_all()

    def fake_inventory(self, **kw: Any) -> list[inventory.Disk]:
        with self.cond:
            shown = any(e == "code" for e, _ in self.events)
        if shown:
            self.inventoried.set()
        return [DISK]

    def wait_for(self, event: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        with self.cond:
            while True:
                for e, doc in self.events:
                    if e == event:
                        return doc
                left = deadline - time.monotonic()
                assert left > 0, f"no {event} event: {self.events}"
                self.cond.wait(left)


class GatedSocket:
    """The donor's socket, holding its key confirmation (its third send) until the target
    has started an inventory or GATE_S passed: whatever the target does before the
    confirmation arrives is what it does during the handshake."""

    def __init__(self, sock: socket.socket, gate: threading.Event) -> None:
        self._sock = sock
        self._gate = gate
        self._sends = 0
        self.gate_was_open: bool | None = None

    def sendall(self, data: bytes) -> None:
        self._sends += 1
        if self._sends == 3:
            self.gate_was_open = self._gate.wait(GATE_S)
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    monkeypatch.setattr(inventory, "inventory", rig.fake_inventory)
    rig.thread.start()
    try:
        yield rig
    finally:
        rig.r.stop()
        rig.thread.join(timeout=30)


def test_the_hello_inventory_runs_during_the_handshake(rig: Rig) -> None:
    shown = rig.wait_for("code")
    sock = socket.create_connection(("127.0.0.1", shown["port"]), timeout=10)
    gated = GatedSocket(sock, rig.inventoried)
    chan = channel.donor_handshake(gated, shown["code"], None, None)  # type: ignore[arg-type]
    try:
        mtype, hello = chan.recv_json()
    finally:
        chan.close()
    assert mtype == messages.HELLO
    assert [d["serial"] for d in hello["disks"]] == ["S1"]
    assert gated.gate_was_open is True, "the inventory waited for the handshake to end"


def test_a_wrong_code_is_sent_no_inventory(rig: Rig) -> None:
    shown = rig.wait_for("code")
    code = str(shown["code"])
    wrong = code[:-5] + ("00000" if not code.endswith("00000") else "11111")
    sock = socket.create_connection(("127.0.0.1", shown["port"]), timeout=10)
    with pytest.raises(channel.WrongCode):
        channel.donor_handshake(sock, wrong, None, None)
    rig.wait_for("wrong_code")
    assert not any(e == "connected" for e, _ in rig.events)


class HangUp(OSError):
    pass


class HangingUpSocket:
    """A stranger's socket: it sends its hello and its SPAKE2 message (which is all it
    takes to be admitted as a code attempt), then hangs up instead of confirming."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sends = 0

    def sendall(self, data: bytes) -> None:
        self._sends += 1
        if self._sends == 3:
            self._sock.close()
            raise HangUp("hung up before the key confirmation")
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_hang_ups_after_the_spake2_message_do_not_pile_up_inventories(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission needs no code, and a hang-up costs no guess: were every admitted attempt
    to start its own inventory, a stranger looping on connect/SPAKE2/close would leave
    lsblk and wipefs runs piling up behind a slow disk. At most one runs at a time."""
    release = threading.Event()
    started: list[float] = []

    def slow_inventory(**kw: Any) -> list[inventory.Disk]:
        with rig.cond:
            if not any(e == "code" for e, _ in rig.events):
                return [DISK]  # the receiver's own, before it shows the code
            started.append(time.monotonic())
        release.wait(30)  # a disk whose probe hangs in I/O
        return [DISK]

    shown = rig.wait_for("code")
    monkeypatch.setattr(inventory, "inventory", slow_inventory)
    try:
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", shown["port"]), timeout=10)
            with pytest.raises((HangUp, channel.ChannelError, OSError)):
                channel.donor_handshake(HangingUpSocket(sock), shown["code"], None, None)  # type: ignore[arg-type]
            sock.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(started) < 1:
            time.sleep(0.05)
        time.sleep(0.5)  # room for any further inventory to start
        assert len(started) == 1, f"{len(started)} inventories started for 5 hang-ups"
    finally:
        release.set()
