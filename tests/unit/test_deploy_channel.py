"""The deploy channel over socketpairs and 127.0.0.1: handshake (right/wrong code, replay,
bad hello, busy, stale announcement), records (tampering, drop, reorder, truncation,
lengths), the message state machine, and the discovery datagram."""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from spake2 import SPAKE2_A  # type: ignore[import-untyped]

from spk_visor.deploy import channel, discovery, messages
from spk_visor.deploy.channel import (
    MAX_PAYLOAD,
    ChannelClosed,
    ChannelError,
    SecureChannel,
    WrongCode,
    donor_handshake,
    target_handshake,
)
from spk_visor.deploy.code import Code, password
from spk_visor.deploy.messages import StateMachine

CODE = Code("42", "K7QX9", 0)
IID = bytes(range(16))
T = 5.0  # every blocking call in these tests is bounded by this


def _thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def _handshake_pair(
    donor_code: str,
    target_code: Code = CODE,
    *,
    epoch: int | None = 0,
    iid: bytes | None = IID,
) -> tuple[dict[str, Any], dict[str, Any]]:
    d, t = socket.socketpair()
    th_t, res_t = _thread(lambda: target_handshake(t, target_code, IID, timeout=T))
    th_d, res_d = _thread(lambda: donor_handshake(d, donor_code, epoch, iid, timeout=T))
    th_t.join(2 * T)
    th_d.join(2 * T)
    assert not th_t.is_alive() and not th_d.is_alive()
    return res_d, res_t


def _recv_all(sock: socket.socket, timeout: float = T) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            b = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


def _blobs(data: bytes) -> list[bytes]:
    """Split a handshake stream (after the 8-byte hello) into its length-prefixed blobs."""
    out, pos = [], channel.HELLO_LEN
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 2], "big")
        out.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    return out


# -- handshake -----------------------------------------------------------------------


def test_right_code_works_both_ways_with_same_verifier() -> None:
    res_d, res_t = _handshake_pair("42-k7qx9")  # typed in lower case: normalised
    donor, target = res_d["value"], res_t["value"]
    assert isinstance(donor, SecureChannel) and isinstance(target, SecureChannel)
    assert donor.verifier == target.verifier
    assert len(donor.verifier) == 4 and donor.verifier.isdigit()
    donor.send(messages.PLAN, b"to target")
    assert target.recv() == (messages.PLAN, b"to target")
    target.send_json(messages.HELLO, {"disks": [1, 2]})
    assert donor.recv_json() == (messages.HELLO, {"disks": [1, 2]})
    big = os.urandom(MAX_PAYLOAD)

    def send_big() -> None:
        donor.send(messages.DATA, big)
        donor.send(messages.END)

    th, _ = _thread(send_big)
    assert target.recv() == (messages.DATA, big)
    th.join(T)
    assert target.recv() == (messages.END, b"")
    donor.close()
    with pytest.raises(ChannelClosed):
        target.recv()
    target.close()


def test_verifier_differs_between_sessions() -> None:
    verifiers = set()
    for _ in range(4):
        res_d, res_t = _handshake_pair("42-K7QX9")
        verifiers.add(res_d["value"].verifier)
        res_d["value"].close()
        res_t["value"].close()
    assert len(verifiers) > 1  # fresh SPAKE2 keys each time (equal 4 times: 1 in 10^12)


def test_wrong_code_fails_on_both_sides() -> None:
    res_d, res_t = _handshake_pair("42-K7QX8")
    assert isinstance(res_t.get("error"), WrongCode)
    assert isinstance(res_d.get("error"), WrongCode)


def test_target_never_confirms_to_a_wrong_donor() -> None:
    """A hand-driven donor with the wrong password: the target answers its confirmation with
    an empty blob, never with its own HMAC (which would be an offline-guessing oracle)."""
    d, t = socket.socketpair()
    th, res = _thread(lambda: target_handshake(t, CODE, IID, timeout=T))
    d.sendall(channel.hello_bytes())
    pake = SPAKE2_A(password("42", "AAAAA", 0), idA=channel.ID_DONOR, idB=channel.ID_TARGET)
    msg_a = pake.start()
    d.sendall(len(msg_a).to_bytes(2, "big") + msg_a)
    d.sendall((32).to_bytes(2, "big") + b"\x00" * 32)
    sent = _recv_all(d)
    th.join(2 * T)
    assert isinstance(res.get("error"), WrongCode)
    blobs = _blobs(sent)
    assert len(blobs) == 3  # params, SPAKE2 B, then the empty rejection
    assert len(blobs[0]) == 20 and len(blobs[1]) == 33
    assert blobs[2] == b""


def test_target_waits_for_donor_confirmation_first() -> None:
    """A donor that completes SPAKE2 but waits for the target to confirm first gets nothing:
    the target times out without ever sending its confirmation."""
    d, t = socket.socketpair()
    th, res = _thread(lambda: target_handshake(t, CODE, IID, timeout=1.0))
    d.sendall(channel.hello_bytes())
    pake = SPAKE2_A(CODE.password(), idA=channel.ID_DONOR, idB=channel.ID_TARGET)
    msg_a = pake.start()
    d.sendall(len(msg_a).to_bytes(2, "big") + msg_a)
    sent = _recv_all(d)
    th.join(2 * T)
    err = res.get("error")
    assert isinstance(err, ChannelError) and "timed out" in str(err)
    assert [len(b) for b in _blobs(sent)] == [20, 33]  # params and B only, no confirmation


class _Tap:
    """A relay between a donor and a target that records the donor's bytes; `rewrite`,
    if given, changes the donor's first chunk on the way (an active attacker)."""

    def __init__(self, rewrite: Callable[[bytes], bytes] | None = None) -> None:
        self.rewrite = rewrite
        self.donor_side, self._a = socket.socketpair()
        self._b, self.target_side = socket.socketpair()
        self.from_donor = bytearray()
        self._threads = [
            threading.Thread(target=self._pump, args=(self._a, self._b, True), daemon=True),
            threading.Thread(target=self._pump, args=(self._b, self._a, False), daemon=True),
        ]
        for th in self._threads:
            th.start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        src.settimeout(T)
        try:
            while b := src.recv(65536):
                if record:
                    self.from_donor += b
                    if self.rewrite is not None:
                        b, self.rewrite = self.rewrite(b), None
                dst.sendall(b)
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def join(self) -> None:
        for th in self._threads:
            th.join(2 * T)


def test_replayed_handshake_fails() -> None:
    tap = _Tap()
    th_t, res_t = _thread(lambda: target_handshake(tap.target_side, CODE, IID, timeout=T))
    donor = donor_handshake(tap.donor_side, str(CODE), 0, IID, timeout=T)
    th_t.join(2 * T)
    target = res_t["value"]
    donor.send(messages.PLAN, b"secret plan")
    assert target.recv() == (messages.PLAN, b"secret plan")
    donor.close()
    target.close()
    tap.join()
    recorded = bytes(tap.from_donor)
    assert len(recorded) > 8 + 2 + 33 + 2 + 32

    # Same code, same instance id, even: the new target's fresh SPAKE2 share makes the
    # recorded confirmation useless.
    d, t = socket.socketpair()
    th, res = _thread(lambda: target_handshake(t, CODE, IID, timeout=T))
    d.sendall(recorded)
    sent = _recv_all(d)
    th.join(2 * T)
    assert isinstance(res.get("error"), WrongCode)
    assert _blobs(sent)[2] == b""


def test_bad_hello_closes_before_crypto() -> None:
    for bad in (b"GET / HT", b"SPKD\x00\x09\x00\x00"):
        d, t = socket.socketpair()
        th, res = _thread(lambda t=t: target_handshake(t, CODE, IID, timeout=T))  # type: ignore[misc]
        d.sendall(bad)
        sent = _recv_all(d)
        th.join(2 * T)
        assert isinstance(res.get("error"), ChannelError)
        assert not isinstance(res.get("error"), WrongCode)  # not counted as an attempt
        assert sent == channel.hello_bytes(channel.cipher_flags())  # our hello only: no SPAKE2
        d.close()


def test_donor_rejects_bad_hello() -> None:
    d, t = socket.socketpair()
    t.sendall(b"SSH-2.0-")
    with pytest.raises(ChannelError, match="bad hello"):
        donor_handshake(d, "42-K7QX9", 0, IID, timeout=T)
    t.close()


def test_busy_target() -> None:
    d, t = socket.socketpair()
    channel.send_busy(t)
    with pytest.raises(channel.Busy):
        donor_handshake(d, "42-K7QX9", 0, IID, timeout=T)


def test_stale_announcement_fails_before_pake() -> None:
    # The target rotated (epoch 1); a donor holding epoch 0 stops before SPAKE2, so the
    # target sees a dropped connection, not a wrong code.
    res_d, res_t = _handshake_pair("42-K7QX9", Code("42", "K7QX9", 1), epoch=0)
    assert "epoch" in str(res_d.get("error"))
    assert isinstance(res_t.get("error"), ChannelError)
    assert not isinstance(res_t.get("error"), WrongCode)
    res_d, res_t = _handshake_pair("42-K7QX9", iid=b"\xff" * 16)
    assert "restarted or rotated" in str(res_d.get("error"))
    assert not isinstance(res_t.get("error"), WrongCode)
    # --target without an announcement: take the target's epoch and instance id.
    res_d, res_t = _handshake_pair("42-K7QX9", Code("42", "K7QX9", 1), epoch=None, iid=None)
    assert res_d["value"].verifier == res_t["value"].verifier


def test_handshake_rejects_oversize_blob() -> None:
    d, t = socket.socketpair()
    th, res = _thread(lambda: target_handshake(t, CODE, IID, timeout=T))
    d.sendall(channel.hello_bytes() + (513).to_bytes(2, "big"))
    th.join(2 * T)
    assert "limit 512" in str(res.get("error"))


# -- records -------------------------------------------------------------------------


K1, K2 = b"\x01" * 32, b"\x02" * 32


@pytest.fixture
def pair() -> Iterator[tuple[SecureChannel, SecureChannel]]:
    a, b = socket.socketpair()
    sender = SecureChannel(a, K1, K2, "0000", idle_timeout=T)
    receiver = SecureChannel(b, K2, K1, "0000", idle_timeout=T)
    yield sender, receiver
    sender.close()
    receiver.close()


def _split(raw: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        n = int.from_bytes(raw[pos : pos + 4], "big")
        out.append(raw[pos : pos + 4 + n])
        pos += 4 + n
    return out


def _wire_records(payloads: list[tuple[int, bytes]], end: bool = True) -> list[bytes]:
    """What a sender writes for these records, split into raw records."""
    a, b = socket.socketpair()
    sender = SecureChannel(a, K1, K2, "0000", idle_timeout=T)
    for mtype, payload in payloads:
        sender.send(mtype, payload)
    if end:
        sender.send(messages.END)
    sender.close()
    raw = _recv_all(b)
    b.close()
    return _split(raw)


def _deliver(raw: bytes) -> tuple[list[tuple[int, bytes]], BaseException | None]:
    """Feed raw bytes (then EOF) to a receiver; what it accepted and how it stopped."""
    a, b = socket.socketpair()
    receiver = SecureChannel(b, K2, K1, "0000", idle_timeout=T)
    a.sendall(raw)
    a.shutdown(socket.SHUT_WR)
    got: list[tuple[int, bytes]] = []
    try:
        while True:
            got.append(receiver.recv())
    except ChannelError as exc:
        err: BaseException | None = exc
    # After a failure the receiver has sent nothing and closed: the peer sees only EOF.
    assert _recv_all(a, 1.0) == b""
    a.close()
    return got, err


MSGS = [(messages.FILE_BEGIN, b"abc"), (messages.DATA, b"0123456789"), (messages.FILE_END, b"")]


def test_untouched_stream_is_accepted() -> None:
    recs = _wire_records(MSGS)
    got, err = _deliver(b"".join(recs))
    assert got == [*MSGS, (messages.END, b"")]
    assert isinstance(err, ChannelClosed)


def test_any_flipped_bit_is_rejected() -> None:
    raw = b"".join(_wire_records(MSGS))
    for pos in range(len(raw)):
        for bit in (0, 7):
            bad = bytearray(raw)
            bad[pos] ^= 1 << bit
            got, err = _deliver(bytes(bad))
            assert err is not None and not isinstance(err, ChannelClosed), (pos, bit)
            # Records before the damaged one may be delivered; nothing after it.
            assert got == [*MSGS, (messages.END, b"")][: len(got)]
            assert len(got) < 4


def test_flipped_ciphertext_is_a_tag_failure() -> None:
    recs = _wire_records(MSGS)
    bad = bytearray(recs[1])
    bad[6] ^= 0x10
    got, err = _deliver(recs[0] + bytes(bad) + recs[2] + recs[3])
    assert got == MSGS[:1]
    assert "authentication failed" in str(err)


@pytest.mark.parametrize(
    "order",
    [
        [0, 2, 3],  # dropped
        [0, 2, 1, 3],  # reordered
        [0, 1, 1, 2, 3],  # replayed record
        [1, 2, 3],  # first dropped
    ],
)
def test_dropped_reordered_replayed_records_fail(order: list[int]) -> None:
    recs = _wire_records(MSGS)
    got, err = _deliver(b"".join(recs[i] for i in order))
    assert "authentication failed" in str(err)
    assert len(got) < len(order)


def test_truncation_without_end_is_an_error() -> None:
    recs = _wire_records(MSGS, end=False)
    got, err = _deliver(b"".join(recs))
    assert got == MSGS
    assert type(err) is ChannelError and "without END" in str(err)
    # Cut inside a record.
    got, err = _deliver(b"".join(recs)[:-5])
    assert got == MSGS[:2]
    assert type(err) is ChannelError and "inside a record" in str(err)


@pytest.mark.parametrize("length", [0, 16, channel.MAX_RECORD + 1, 0xFFFFFFFF])
def test_bad_length_rejected_before_reading_body(length: int) -> None:
    a, b = socket.socketpair()
    receiver = SecureChannel(b, K2, K1, "0000", idle_timeout=T)
    a.sendall(length.to_bytes(4, "big"))  # and nothing else, and no EOF
    start = time.monotonic()
    with pytest.raises(ChannelError, match="bad record length"):
        receiver.recv()
    assert time.monotonic() - start < T - 2  # did not wait for a body (idle_timeout=T)
    a.close()


def test_largest_legal_record_and_oversize_send(pair: tuple[SecureChannel, SecureChannel]) -> None:
    sender, receiver = pair
    with pytest.raises(ValueError, match="send_stream"):
        sender.send(messages.DATA, b"x" * (MAX_PAYLOAD + 1))
    payload = os.urandom(MAX_PAYLOAD)
    th, res = _thread(receiver.recv)
    sender.send(messages.DATA, payload)
    th.join(T)
    assert res["value"] == (messages.DATA, payload)


def test_recv_timeout_keeps_channel_usable(pair: tuple[SecureChannel, SecureChannel]) -> None:
    sender, receiver = pair
    receiver.settimeout(0.2)
    with pytest.raises(ChannelError, match="no data"):
        receiver.recv()
    sender.send(messages.PROGRESS, b"later")
    assert receiver.recv() == (messages.PROGRESS, b"later")


def test_dead_channel_refuses_further_use() -> None:
    recs = _wire_records(MSGS)
    bad = bytearray(recs[0])
    bad[-1] ^= 1
    a, b = socket.socketpair()
    receiver = SecureChannel(b, K2, K1, "0000", idle_timeout=T)
    a.sendall(bytes(bad) + b"".join(recs[1:]))
    with pytest.raises(ChannelError, match="authentication"):
        receiver.recv()
    with pytest.raises(ChannelError, match="closed"):
        receiver.recv()
    with pytest.raises(ChannelError, match="closed"):
        receiver.send(messages.ERROR, b"")
    a.close()


def test_send_stream_over_tcp_loopback() -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(T)

    def target_side() -> tuple[str, int, int]:
        conn, _ = listener.accept()
        chan = target_handshake(conn, CODE, IID, timeout=T)
        chan.settimeout(T)
        h, n, records = hashlib.sha256(), 0, 0
        while True:
            mtype, view = chan.recv_view()
            if mtype == messages.END:
                break
            assert mtype == messages.DATA
            assert len(view) <= channel.CHUNK
            h.update(view)
            n += len(view)
            records += 1
        chan.send_json(messages.REPORT, {"sha256": h.hexdigest()})
        chan.close()
        return h.hexdigest(), n, records

    th, res = _thread(target_side)
    sock = socket.create_connection(("127.0.0.1", port), timeout=T)
    donor = donor_handshake(sock, str(CODE), 0, IID, timeout=T)
    donor.settimeout(T)
    progress: list[int] = []
    digest = hashlib.sha256()
    donor.send_stream(messages.DATA, io.BytesIO(data), len(data), progress.append, digest)
    donor.send(messages.END)
    th.join(T)
    assert "error" not in res, res
    assert donor.recv_json() == (messages.REPORT, {"sha256": hashlib.sha256(data).hexdigest()})
    th.join(T)
    listener.close()
    donor.close()
    digest_hex, n, records = res["value"]
    assert digest_hex == digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert n == len(data) == sum(progress)
    assert records == len(progress) == -(-len(data) // channel.CHUNK)


def test_send_stream_short_source(pair: tuple[SecureChannel, SecureChannel]) -> None:
    sender, _ = pair
    with pytest.raises(ValueError, match="ended 10 bytes before"):
        sender.send_stream(messages.DATA, io.BytesIO(b"x" * 90), 100)


# -- state machine -------------------------------------------------------------------

D, TG = "donor", "target"
HAPPY = [
    (TG, messages.HELLO),
    (D, messages.PLAN),
    (TG, messages.PLAN_REFUSED),
    (D, messages.PLAN),
    (TG, messages.PLAN_OK),
    (TG, messages.PHASE),
    (D, messages.FILE_BEGIN),
    (D, messages.DATA),
    (D, messages.DATA),
    (TG, messages.PROGRESS),
    (D, messages.FILE_END),
    (D, messages.FILE_BEGIN),  # pipelined: file 1 starts before file 0 is acknowledged
    (TG, messages.FILE_OK),
    (D, messages.DATA),
    (D, messages.FILE_END),
    (TG, messages.FILE_BAD),
    (D, messages.FILE_BEGIN),  # resend
    (D, messages.DATA),
    (D, messages.FILE_END),
    (TG, messages.FILE_OK),
    (D, messages.END),
    (TG, messages.PHASE),
    (TG, messages.REPORT),
    (D, messages.REBOOT),
]


def _drive(machine: StateMachine, steps: list[tuple[str, int]]) -> None:
    for sender, mtype in steps:
        machine.check("send" if sender == machine.side else "recv", mtype)


@pytest.mark.parametrize("side", [D, TG])
def test_state_machine_accepts_a_full_deploy(side: Any) -> None:
    _drive(StateMachine(side), HAPPY)


@pytest.mark.parametrize(
    ("prefix", "bad"),
    [
        ([], (D, messages.PLAN)),  # PLAN before the target's HELLO
        ([], (TG, messages.PLAN_OK)),
        ([(TG, messages.HELLO)], (TG, messages.HELLO)),
        ([(TG, messages.HELLO)], (TG, messages.PLAN_OK)),  # no PLAN to answer
        ([(TG, messages.HELLO)], (D, messages.FILE_BEGIN)),
        ([(TG, messages.HELLO), (D, messages.PLAN)], (D, messages.PLAN)),  # unanswered
        ([(TG, messages.HELLO), (D, messages.PLAN)], (D, messages.FILE_BEGIN)),  # not OK yet
        ([(TG, messages.HELLO), (D, messages.PLAN)], (TG, messages.PHASE)),
        (HAPPY[:5], (D, messages.DATA)),  # DATA outside a file
        (HAPPY[:5], (D, messages.FILE_END)),
        (HAPPY[:5], (D, messages.PLAN)),  # no second PLAN after PLAN_OK
        (HAPPY[:5], (TG, messages.FILE_OK)),  # no file ended
        (HAPPY[:5], (TG, messages.REPORT)),  # REPORT before END
        (HAPPY[:8], (D, messages.END)),  # END inside a file
        (HAPPY[:8], (D, messages.FILE_BEGIN)),
        (HAPPY[:21], (D, messages.REBOOT)),  # REBOOT before REPORT
        (HAPPY[:21], (D, messages.DATA)),  # after END
        (HAPPY, (D, messages.REBOOT)),
        (HAPPY[:23], (TG, messages.PROGRESS)),  # after REPORT
        ([(TG, messages.HELLO), (TG, messages.ERROR)], (TG, messages.PLAN_OK)),
        ([(TG, messages.HELLO)], (D, 99)),
    ],
)
@pytest.mark.parametrize("side", [D, TG])
def test_state_machine_rejects_out_of_order(
    side: Any, prefix: list[tuple[str, int]], bad: tuple[str, int]
) -> None:
    machine = StateMachine(side)
    _drive(machine, prefix)
    with pytest.raises(ChannelError, match=f"unexpected {messages.name(bad[1])}"):
        _drive(machine, [bad])


def test_closing_types_agree() -> None:
    assert channel._CLOSING_TYPES == messages.CLOSING
    assert messages.ERROR == 15
    assert len(messages.NAMES) == 16


# -- discovery -----------------------------------------------------------------------

PUBLIC_KEYS = {
    "magic",
    "versions",
    "nameplate",
    "epoch",
    "instance_id",
    "port",
    "state",
    "mac",
    "boot_mode",
    "shim_version",
}


def test_announcement_has_only_public_fields() -> None:
    code = Code("42", "K7QX9", 3)
    data = discovery.announcement_bytes(
        code.nameplate, code.epoch, IID, 47475, "waiting", "52:54:00:12:34:56", "uefi", "1.2.3"
    )
    assert len(data) < 512
    doc = json.loads(data)
    assert set(doc) == PUBLIC_KEYS
    assert doc["nameplate"] == "42" and doc["epoch"] == 3 and doc["instance_id"] == IID.hex()
    # The function cannot see the secret at all ...
    params = set(inspect.signature(discovery.announcement_bytes).parameters)
    assert not params & {"secret", "code", "password"}
    # ... and no value derived from it appears anywhere in the datagram.
    pw = code.password()
    derived: list[str | bytes] = [code.secret, code.secret.lower(), str(code), pw]
    for fn in (hashlib.sha256, hashlib.sha1, hashlib.md5, hashlib.blake2b):
        for src in (code.secret.encode(), pw, str(code).encode()):
            digest = fn(src).digest()
            derived += [digest[:4], digest[:4].hex().encode(), digest.hex()[:8]]
    for value in derived:
        needle = value.encode() if isinstance(value, str) else value
        assert needle not in data, value


def test_announcement_stays_small_with_hostile_hints() -> None:
    data = discovery.announcement_bytes(
        "1234", 2**32 - 1, IID, 65535, "resumable", *["x" * 999] * 3
    )
    assert len(data) < 512
    with pytest.raises(ValueError, match="state"):
        discovery.announcement_bytes("42", 0, IID, 1, "hacked")


def test_parse_announcement_rejects_garbage_and_sanitises() -> None:
    good = discovery.announcement_bytes("42", 1, IID, 47475, "busy", "\x1b[2Jmac", "bios", "v1")
    ann = discovery.parse_announcement(good, "10.0.0.5")
    assert ann is not None
    assert (ann.nameplate, ann.epoch, ann.instance_bytes, ann.port, ann.state) == (
        "42",
        1,
        IID,
        47475,
        "busy",
    )
    assert ann.mac == "[2Jmac" and ann.address == "10.0.0.5"  # no ESC reaches the screen
    doc = json.loads(good)
    for key, value in [
        ("magic", "SPKX"),
        ("versions", [99]),
        ("nameplate", "4x"),
        ("epoch", -1),
        ("epoch", "1"),
        ("instance_id", "zz" * 16),
        ("instance_id", "00"),
        ("port", 0),
        ("state", "pwned"),
    ]:
        bad = json.dumps({**doc, key: value}).encode()
        assert discovery.parse_announcement(bad, "x") is None, key
    for raw in (b"", b"\xff\xfe", b"[]", b"{}", good + b" " * 512):
        assert discovery.parse_announcement(raw, "x") is None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("dest", ["127.0.0.1", "127.255.255.255"])
def test_announcer_and_discover_on_loopback(dest: str) -> None:
    port = _free_udp_port()
    iid2 = os.urandom(16)
    ann = discovery.Announcer(
        "42", 0, IID, 47475, mac="52:54:00:00:00:01", discovery_port=port,
        destinations=[dest], interval=0.1, busy_interval=0.1,
    )  # fmt: skip
    other = discovery.Announcer("43", 0, iid2, 47476, discovery_port=port, destinations=[dest])
    try:
        found = discovery.discover("42", port=port, timeout=T, settle=0.5)
        assert len(found) == 1
        a = found[0]
        assert (a.nameplate, a.instance_bytes, a.port, a.mac) == (
            "42",
            IID,
            47475,
            "52:54:00:00:00:01",
        )
        assert a.address == "127.0.0.1"
        ann.update(state="busy", epoch=1, instance_id=iid2)
        found = discovery.discover("42", port=port, timeout=T, settle=0.3)
        assert [(f.state, f.epoch, f.instance_bytes) for f in found] == [("busy", 1, iid2)]
    finally:
        ann.stop()
        other.stop()
    assert ann.sent > 0 and not ann.errors


def test_announcer_update_sends_at_once() -> None:
    """With both periods an hour long, the only packets are the first one and the one
    update() must send at once: the second can arrive within T only if update() sent it.
    No wall-clock bound, so a loaded machine cannot fail it."""
    port = _free_udp_port()
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", port))
    listener.settimeout(T)
    ann = discovery.Announcer(
        "42", 0, IID, 47475, discovery_port=port, destinations=["127.0.0.1"],
        interval=3600, busy_interval=3600,
    )  # fmt: skip
    try:
        first = discovery.parse_announcement(listener.recvfrom(4096)[0], "127.0.0.1")
        assert first is not None and first.state == "waiting"
        iid2 = os.urandom(16)
        ann.update(state="busy", epoch=1, instance_id=iid2)
        second = discovery.parse_announcement(listener.recvfrom(4096)[0], "127.0.0.1")
        assert second is not None
        assert (second.state, second.epoch, second.instance_bytes) == ("busy", 1, iid2)
    finally:
        ann.stop()
        listener.close()


def test_discover_times_out_empty() -> None:
    start = time.monotonic()
    assert discovery.discover("99", port=_free_udp_port(), timeout=0.3) == []
    # A bound, not a speed test: discover() must not wait past its timeout by much.
    assert time.monotonic() - start < 0.3 + T


def test_broadcast_addresses_include_limited_broadcast() -> None:
    addrs = discovery.broadcast_addresses()
    assert addrs[0] == "255.255.255.255"
    for a in addrs:
        socket.inet_aton(a)


# ---- cipher negotiation and the receive ring ---------------------------------------------


def _cpuinfo(tmp_path: Any, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 {flags}\n\n")
    return str(path)


def test_aes_ni_is_read_from_the_cpu_flags(tmp_path: Any) -> None:
    assert channel.has_aes_ni(_cpuinfo(tmp_path, "pclmulqdq aes avx2")) is True
    # `vaes` or `aes_foo` alone is not the flag; a missing file is "no".
    assert channel.has_aes_ni(_cpuinfo(tmp_path, "vaes sha_ni")) is False
    assert channel.has_aes_ni(str(tmp_path / "missing")) is False


@pytest.mark.parametrize(
    ("flags", "cipher"), [("aes", "aes-256-gcm"), ("sse4_2", "chacha20-poly1305")]
)
def test_handshake_negotiates_the_cipher_from_the_cpu(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, flags: str, cipher: str
) -> None:
    monkeypatch.setattr(channel, "CPUINFO", _cpuinfo(tmp_path, flags))
    res_d, res_t = _handshake_pair(str(CODE))
    donor, target = res_d["value"], res_t["value"]
    try:
        assert donor.cipher == target.cipher == cipher
        donor.send(messages.PLAN, b"plan")
        assert target.recv() == (messages.PLAN, b"plan")
    finally:
        donor.close()
        target.close()


def test_only_one_side_with_aes_ni_means_chacha() -> None:
    assert channel.cipher_name(channel.FLAG_AES, 0) == "chacha20-poly1305"
    assert channel.cipher_name(0, channel.FLAG_AES) == "chacha20-poly1305"
    assert channel.cipher_name(channel.FLAG_AES, channel.FLAG_AES) == "aes-256-gcm"


def test_a_cipher_flag_stripped_on_the_wire_fails_key_confirmation(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay that clears the donor's AES flag (a downgrade) changes the transcript:
    the target refuses the donor's confirmation, nothing is encrypted either way."""
    monkeypatch.setattr(channel, "CPUINFO", _cpuinfo(tmp_path, "aes"))

    def strip_aes(first: bytes) -> bytes:
        hello = bytearray(first)
        hello[7] &= ~channel.FLAG_AES & 0xFF
        return bytes(hello)

    tap = _Tap(strip_aes)
    th_t, res_t = _thread(lambda: target_handshake(tap.target_side, CODE, IID, timeout=T))
    with pytest.raises((WrongCode, channel.ChannelError)):
        donor_handshake(tap.donor_side, str(CODE), 0, IID, timeout=T)
    th_t.join(2 * T)
    assert isinstance(res_t.get("error"), WrongCode)
    tap.join()


def test_a_received_view_stays_valid_for_the_ring(
    pair: tuple[SecureChannel, SecureChannel],
) -> None:
    """The image decoder holds record views on another thread: a view must not change
    until RECV_RING - 1 further records have been received."""
    sender, receiver = pair
    n = channel.RECV_RING + 2

    def send_all() -> None:
        for i in range(n):
            sender.send(messages.DATA, bytes([i]) * 1000)

    done = threading.Thread(target=send_all, daemon=True)
    done.start()
    views = []
    for i in range(n):
        mtype, view = receiver.recv_view()
        assert mtype == messages.DATA
        views.append(view)
        for j in range(max(0, i - channel.RECV_RING + 1), i + 1):
            assert bytes(views[j]) == bytes([j]) * 1000, (i, j)
    done.join(T)


# ---- streams: send_stream over several records -------------------------------------------

# Four DATA records of up to CHUNK bytes (the size the donor sends).
STREAM = os.urandom(3 * channel.CHUNK + 12345)
STREAM_RECORDS = [
    (messages.DATA, STREAM[i : i + channel.CHUNK]) for i in range(0, len(STREAM), channel.CHUNK)
]


def _stream_wire(cipher: str = "chacha20-poly1305", end: bool = True) -> list[bytes]:
    """The raw records send_stream writes for STREAM (then END)."""
    a, b = socket.socketpair()
    sender = SecureChannel(a, K1, K2, "0000", idle_timeout=T, cipher=cipher)
    th, res = _thread(lambda: _recv_all(b))
    assert sender.send_stream(messages.DATA, io.BytesIO(STREAM), len(STREAM)) == len(STREAM)
    if end:
        sender.send(messages.END)
    sender.close()
    th.join(T)
    b.close()
    return _split(res["value"])


def _deliver_stream(raw: bytes) -> tuple[list[tuple[int, bytes]], BaseException | None]:
    """Like _deliver, for more bytes than a socketpair buffers: fed from a thread."""
    a, b = socket.socketpair()
    receiver = SecureChannel(b, K2, K1, "0000", idle_timeout=T)

    def feed() -> None:
        try:
            a.sendall(raw)
            a.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the receiver gave up and closed: the rest is never read

    th, _ = _thread(feed)
    got: list[tuple[int, bytes]] = []
    try:
        while True:
            got.append(receiver.recv())
    except ChannelError as exc:
        err: BaseException | None = exc
    th.join(T)
    assert not th.is_alive()
    a.close()
    return got, err


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305"])
def test_a_stream_is_records_numbered_in_order(cipher: str) -> None:
    """What send_stream puts on the wire is exactly the record format: u32 length (the
    AAD), then the AEAD of type | payload under the record number as nonce, 0, 1, 2, ...
    with no gap or repeat."""
    records = _stream_wire(cipher)
    assert len(records) == len(STREAM_RECORDS) + 1
    aead = AESGCM(K1) if cipher == "aes-256-gcm" else ChaCha20Poly1305(K1)
    plain = []
    for n, record in enumerate(records):
        header = record[:4]
        assert int.from_bytes(header, "big") == len(record) - 4
        plain.append(aead.decrypt(n.to_bytes(12, "big"), record[4:], header))
    assert plain[-1] == bytes([messages.END])
    assert [(p[0], p[1:]) for p in plain[:-1]] == STREAM_RECORDS


def test_an_untouched_stream_is_received_whole() -> None:
    got, err = _deliver_stream(b"".join(_stream_wire()))
    assert got == [*STREAM_RECORDS, (messages.END, b"")]
    assert isinstance(err, ChannelClosed)


@pytest.mark.parametrize("record", range(len(STREAM_RECORDS) + 1))
def test_a_flipped_bit_in_a_stream_fails_at_that_record(record: int) -> None:
    """A bit flipped in the length, the ciphertext or the tag of one 1 MiB record delivers
    every record before it and nothing from it on."""
    records = _stream_wire()
    size = len(records[record])
    for pos in (0, 3, 4, 5, size // 2, size - 17, size - 1):
        bad = [bytearray(r) for r in records]
        bad[record][pos] ^= 0x04
        got, err = _deliver_stream(b"".join(bytes(r) for r in bad))
        assert err is not None and not isinstance(err, ChannelClosed), (record, pos)
        assert got == STREAM_RECORDS[:record], (record, pos)


@pytest.mark.parametrize(
    "order",
    [
        [0, 2, 3, 4],  # dropped
        [0, 2, 1, 3, 4],  # reordered
        [0, 1, 1, 2, 3, 4],  # replayed
        [1, 2, 3, 4],  # first dropped
        [0, 1, 2, 4],  # last DATA dropped: END arrives as record 3
    ],
)
def test_dropped_reordered_replayed_stream_records_fail(order: list[int]) -> None:
    records = _stream_wire()
    got, err = _deliver_stream(b"".join(records[i] for i in order))
    assert "authentication failed" in str(err)
    first_bad = next(k for k, i in enumerate(order) if i != k)
    assert got == STREAM_RECORDS[:first_bad]


def test_a_truncated_stream_is_an_error() -> None:
    records = _stream_wire(end=False)
    got, err = _deliver_stream(b"".join(records))
    assert got == STREAM_RECORDS
    assert type(err) is ChannelError and "without END" in str(err)
    cut = len(records[0]) + len(records[1]) + 1000  # inside the third record
    got, err = _deliver_stream(b"".join(records)[:cut])
    assert got == STREAM_RECORDS[:2]
    assert type(err) is ChannelError and "inside a record" in str(err)


class _Stop(Exception):
    pass


def _stop_at(n: int, exc: BaseException) -> Callable[[int], None]:
    calls = []

    def progress(got: int) -> None:
        calls.append(got)
        if len(calls) == n:
            raise exc

    return progress


@pytest.mark.parametrize("how", ["progress", "short source"])
def test_a_failing_stream_leaves_the_channel_whole(how: str) -> None:
    """A progress callback that raises (the donor's stop-after hook) or a source that ends
    early stops send_stream between records: the receiver authenticates every record sent
    and then the sender's ERROR."""
    a, b = socket.socketpair()
    sender = SecureChannel(a, K1, K2, "0000", idle_timeout=T)
    receiver = SecureChannel(b, K2, K1, "0000", idle_timeout=T)

    def receive() -> list[tuple[int, bytes]]:
        got: list[tuple[int, bytes]] = []
        while not got or got[-1][0] != messages.ERROR:
            got.append(receiver.recv())
        return got

    th, res = _thread(receive)
    if how == "progress":
        with pytest.raises(_Stop):
            sender.send_stream(messages.DATA, io.BytesIO(STREAM), len(STREAM), _stop_at(1, _Stop()))
    else:
        short = STREAM[: 2 * channel.CHUNK + 10]
        with pytest.raises(ValueError, match="source ended"):
            sender.send_stream(messages.DATA, io.BytesIO(short), len(STREAM))
    sender.send_json(messages.ERROR, {"reason": "stopped"})
    th.join(T)
    got = res["value"]
    assert got[-1] == (messages.ERROR, b'{"reason":"stopped"}')
    data = got[:-1]
    if how == "progress":
        assert 1 <= len(data) <= len(STREAM_RECORDS)
        assert data == STREAM_RECORDS[: len(data)]
    else:
        assert data == [*STREAM_RECORDS[:2], (messages.DATA, STREAM[2 * channel.CHUNK :][:10])]
    sender.close()
    receiver.close()


def test_a_peer_gone_mid_stream_is_a_channel_error() -> None:
    a, b = socket.socketpair()
    sender = SecureChannel(a, K1, K2, "0000", idle_timeout=T)
    b.close()
    with pytest.raises(ChannelError, match="connection lost while sending"):
        sender.send_stream(messages.DATA, io.BytesIO(STREAM), len(STREAM))
    with pytest.raises(ChannelError, match="closed"):
        sender.send(messages.ERROR)


def test_a_partial_record_waits_for_the_rest() -> None:
    """A receive that times out in the middle of a record keeps what arrived: the rest
    completes the record."""
    a, b = socket.socketpair()
    receiver = SecureChannel(b, K2, K1, "0000", idle_timeout=T)
    (record,) = _wire_records([(messages.DATA, b"x" * 50_000)], end=False)
    a.sendall(record[:30_000])
    receiver.settimeout(0.2)
    with pytest.raises(ChannelError, match="no data"):
        receiver.recv()
    a.sendall(record[30_000:])
    receiver.settimeout(T)
    assert receiver.recv() == (messages.DATA, b"x" * 50_000)
    receiver.close()
    a.close()


class _SignalMidSend:
    """A socket whose sendall is interrupted by a signal (KeyboardInterrupt) after half of
    the bytes went out, as CPython's sendall does when a handler raises between sends."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.interrupt = False

    def sendall(self, data: Any) -> None:
        if self.interrupt:
            self._sock.sendall(data[: len(data) // 2])
            raise KeyboardInterrupt
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_an_interrupt_inside_a_record_closes_the_channel() -> None:
    """Half a record on the wire cannot be continued: after an interrupt mid-send the
    channel refuses to send (an ERROR sent next would be garbage to the receiver), and the
    receiver sees a truncated record, never a record it could authenticate."""
    a, b = socket.socketpair()
    tap = _SignalMidSend(a)
    sender = SecureChannel(tap, K1, K2, "0000", idle_timeout=T)  # type: ignore[arg-type]
    th, res = _thread(lambda: _recv_all(b))
    sender.send(messages.DATA, b"whole")
    tap.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        sender.send(messages.DATA, b"y" * 10_000)
    tap.interrupt = False
    with pytest.raises(ChannelError, match="closed"):
        sender.send_json(messages.ERROR, {"reason": "interrupted"})
    th.join(T)
    b.close()
    got, err = _deliver(res["value"])
    assert got == [(messages.DATA, b"whole")]
    assert type(err) is ChannelError and "inside a record" in str(err)
