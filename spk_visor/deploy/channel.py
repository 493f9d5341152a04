"""The deploy channel (design/deploy.md, "Connection, PAKE, key schedule" and "Record
framing and AEAD"): hello, SPAKE2, HKDF, key confirmation, then length-prefixed
ChaCha20-Poly1305 records with an implicit per-direction counter nonce.

Handshake on the wire, in order (every blob after the hellos has a 2-byte length prefix):

    both   hello  "SPKD" | version u16 | flags u16       (mismatch: close before any crypto)
    T->D   params instance_id[16] | epoch u32             (public: both are in the broadcast)
    D->T   SPAKE2 message A
    T->D   SPAKE2 message B
    D->T   HMAC(k_confirm, "donor" | transcript)
    T->D   HMAC(k_confirm, "target" | transcript), or an empty blob when the donor's was wrong

The target sends its instance_id and epoch so a donor pointed at it with `--target` (no
announcement) can still derive the same keys, and so a donor holding a stale announcement
learns the code rotated before it burns one of the target's attempts.

Records: u32 length (AAD) | AEAD(type u8 | payload). The receive side reads with recv_into
into one preallocated buffer and decrypts into another; the send side encrypts into a
preallocated buffer, so a record costs one AEAD call and one sendall.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B  # type: ignore[import-untyped]

from spk_visor import strict_json
from spk_visor.deploy.code import Code, parse, password
from spk_visor.errors import RefusedError, TransportError

PORT = 47475
DISCOVERY_PORT = 47474

MAGIC = b"SPKD"
VERSION = 1
HELLO_LEN = 8
FLAG_BUSY = 0x0001  # the target already serves a donor; it closes right after its hello
# "This side encrypts AES-GCM in hardware (AES-NI)": both set -> AES-256-GCM records,
# otherwise ChaCha20-Poly1305 (constant-time and fast without AES instructions). The
# hellos are in the transcript, so a flag changed on the wire fails key confirmation.
FLAG_AES = 0x0002
CPUINFO = "/proc/cpuinfo"
# The target takes no code attempt from this donor now (too many wrong codes from its
# address, or from everyone for this code); it closes right after its hello.
FLAG_LIMITED = 0x0004
_HELLO = struct.Struct(">4sHH")
_PARAMS = struct.Struct(">16sI")
INSTANCE_ID_LEN = 16

ID_DONOR = b"spk-deploy/v1/donor"
ID_TARGET = b"spk-deploy/v1/target"
MAX_HANDSHAKE_BLOB = 512
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0  # mkfs of a large disk sends PHASE first, so minutes of silence are a fault

MAX_PAYLOAD = 1024 * 1024
# DATA payload per record: the largest the receiver accepts. At 1 MiB the per-record Python
# work is about 2 % of the channel's CPU; the rest is the AEAD and the socket copies that raw
# TCP makes too (docs/deploy-channel.md, bench/deploy_channel).
CHUNK = MAX_PAYLOAD
TAG_LEN = 16
MIN_RECORD = 1 + TAG_LEN
MAX_RECORD = 1 + MAX_PAYLOAD + TAG_LEN
MAX_RECORDS = 2**32  # far below the 96-bit counter limit; a deploy needs ~10^5
_RBUF_LEN = 2 * (4 + MAX_RECORD)
# Records decrypt into a ring of this many buffers: a view recv_view returned stays valid
# for RECV_RING - 1 more records, so a consumer on another thread (the image decoder)
# can use it without a copy as long as it keeps fewer than that many in hand.
RECV_RING = 8

# After these peer messages (messages.py numbers END, REPORT, ERROR, BUSY; a unit test keeps
# them in step) a FIN is an orderly close; anywhere else it is truncation.
_CLOSING_TYPES = frozenset({12, 13, 15, 16})


class ChannelError(TransportError):
    """The channel is unusable: bad hello, tag failure, bad length, truncation, timeout."""


class ChannelClosed(ChannelError):
    """The peer closed after a closing message (END, REPORT, ERROR, BUSY): not truncation."""


class Busy(ChannelError):
    """The target cannot serve us now (busy flag in its hello): it serves another donor, or
    (`retry_after` set) it is in the wait that follows a wrong code."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


TargetBusy = Busy


class Limited(ChannelError):
    """The target refuses code attempts from us for now (limited flag in its hello):
    `reason` wrong_code_wait (this address), or code_used_up (everyone, until the code
    rotates), with the seconds left when the target said."""

    def __init__(
        self, message: str, retry_after: float | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


class NotAdmitted(ChannelError):
    """The target's policy refused this attempt after the donor's SPAKE2 message."""


class WrongCode(RefusedError):
    """Key confirmation failed: the two sides did not use the same code."""


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _ReadInto(Protocol):
    def readinto(self, buf: memoryview, /) -> int: ...


Progress = Callable[[int], None]


def hello_bytes(flags: int = 0) -> bytes:
    return _HELLO.pack(MAGIC, VERSION, flags)


def has_aes_ni(cpuinfo: str | None = None) -> bool:
    """Whether the CPU lists the `aes` flag (x86 AES-NI; ARMv8 lists `aes` under Features)."""
    try:
        with open(cpuinfo or CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def cipher_flags() -> int:
    return FLAG_AES if has_aes_ni() else 0


def cipher_name(flags_donor: int, flags_target: int) -> str:
    """The AEAD both hellos agree on."""
    return "aes-256-gcm" if flags_donor & flags_target & FLAG_AES else "chacha20-poly1305"


def send_busy(
    sock: socket.socket,
    linger: float = 1.0,
    retry_after: float | None = None,
    flags: int = FLAG_BUSY,
    reason: str = "wrong_code_wait",
) -> None:
    """Tell a second donor the target is busy (before any crypto), then close.

    With `retry_after`, the target is not serving anyone but waiting out a wrong code: a
    blob after the hello says so and for how many seconds, so the operator who typed the
    right code next is not sent looking for another donor. It is unauthenticated and only
    ever shown, never acted on. Closing a TCP socket with unread data sends RST, which can
    destroy our busy hello in flight; so half-close and read the donor's hello (until it
    hangs up, <= `linger` s)."""
    try:
        sock.settimeout(linger)
        sock.sendall(hello_bytes(flags))
        if retry_after is not None:
            why = {"reason": reason, "retry_after": round(retry_after, 1)}
            blob = json.dumps(why).encode()
            sock.sendall(len(blob).to_bytes(2, "big") + blob)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + linger
        while time.monotonic() < deadline and sock.recv(4096):
            pass
    except OSError:
        pass
    finally:
        _close_quietly(sock)


refuse_busy = send_busy


def donor_handshake(
    sock: socket.socket,
    code_text: str,
    epoch: int | None,
    instance_id: bytes | None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> SecureChannel:
    """Run the donor (SPAKE2 side A) handshake on a connected socket.

    `epoch` and `instance_id` come from the announcement the operator picked; pass None to
    take the target's (e.g. `--target IP` without discovery). If they differ from what the
    target says, this fails *before* the PAKE, so no code attempt is spent on a stale
    announcement. Raises WrongCode when the target rejects our confirmation, Busy,
    or ChannelError; the socket is closed on any failure."""
    nameplate, secret = parse(code_text)
    wire = _Wire(sock, timeout)
    try:
        hello_d = hello_bytes(cipher_flags())
        try:
            wire.send(hello_d)
        except ChannelError as exc:
            # A busy target may have hung up already; its hello can still be read.
            send_error: ChannelError | None = exc
        else:
            send_error = None
        try:
            hello_t = wire.recv_exact(HELLO_LEN)
        except ChannelError as exc:
            if send_error is not None:
                raise send_error from exc
            raise
        flags = _check_hello(hello_t)
        if flags & FLAG_BUSY:
            raise Busy("the target is busy with another donor", _busy_wait(wire))
        if flags & FLAG_LIMITED:
            raise Limited(
                "the target takes no code attempt from this address now", *_wait_note(wire)
            )
        if send_error is not None:
            raise send_error
        params = wire.recv_blob()
        if len(params) != _PARAMS.size:
            raise ChannelError(f"bad target parameters ({len(params)} bytes)")
        their_id, their_epoch = _PARAMS.unpack(params)
        if instance_id is not None and their_id != instance_id:
            raise ChannelError(
                "the target restarted or rotated its code since it was announced; "
                "read the code on its screen again"
            )
        if epoch is not None and their_epoch != epoch:
            raise ChannelError(
                f"the target's code is at epoch {their_epoch}, not {epoch}: it rotated; "
                "read the new code on its screen"
            )
        pake = SPAKE2_A(password(nameplate, secret, their_epoch), idA=ID_DONOR, idB=ID_TARGET)
        msg_a: bytes = pake.start()
        wire.send_blob(msg_a)
        msg_b = wire.recv_blob()
        key = _finish(pake, msg_b)
        transcript = _transcript(hello_d, hello_t, params, msg_a, msg_b, nameplate, their_epoch)
        keys = _Keys(key, their_id, transcript)
        wire.send_blob(keys.confirmation(b"donor"))
        answer = wire.recv_blob()
        if not answer:
            raise WrongCode(f"the target {nameplate} rejected the code: wrong code")
        if not hmac.compare_digest(answer, keys.confirmation(b"target")):
            raise ChannelError(
                "the target failed key confirmation (not the target showing the code)"
            )
        cipher = cipher_name(_check_hello(hello_d), flags)
        return SecureChannel(sock, keys.d2t, keys.t2d, keys.verifier, cipher=cipher)
    except BaseException:
        _close_quietly(sock)
        raise


def target_handshake(
    sock: socket.socket,
    code: Code,
    instance_id: bytes,
    timeout: float = HANDSHAKE_TIMEOUT,
    on_wrong_code: Callable[[], None] | None = None,
    admit: Callable[[], bool] | None = None,
) -> SecureChannel:
    """Run the target (SPAKE2 side B) handshake on an accepted socket.

    `admit` is asked once the donor's SPAKE2 message arrived, before the target answers
    it: that is where a code attempt begins (False: NotAdmitted, nothing answered).

    The target checks the donor's confirmation first and sends its own only if it matched;
    otherwise it calls `on_wrong_code` (before the donor can learn the verdict and try
    again), sends an empty blob, closes and raises WrongCode (the caller counts the
    attempt, waits and maybe rotates). The socket is closed on any failure."""
    if len(instance_id) != INSTANCE_ID_LEN:
        raise ValueError(f"instance_id must be {INSTANCE_ID_LEN} bytes")
    wire = _Wire(sock, timeout)
    try:
        hello_t = hello_bytes(cipher_flags())
        wire.send(hello_t)
        hello_d = wire.recv_exact(HELLO_LEN)
        flags_d = _check_hello(hello_d)
        params = _PARAMS.pack(instance_id, code.epoch)
        wire.send_blob(params)
        msg_a = wire.recv_blob()
        if admit is not None and not admit():
            raise NotAdmitted("code attempt not admitted by the target's policy")
        pake = SPAKE2_B(code.password(), idA=ID_DONOR, idB=ID_TARGET)
        msg_b: bytes = pake.start()
        wire.send_blob(msg_b)
        key = _finish(pake, msg_a)
        transcript = _transcript(hello_d, hello_t, params, msg_a, msg_b, code.nameplate, code.epoch)
        keys = _Keys(key, instance_id, transcript)
        theirs = wire.recv_blob()
        if not hmac.compare_digest(theirs, keys.confirmation(b"donor")):
            if on_wrong_code is not None:
                on_wrong_code()
            try:
                wire.send_blob(b"")
            except ChannelError:
                pass
            raise WrongCode("wrong code: the donor's key confirmation did not match")
        wire.send_blob(keys.confirmation(b"target"))
        cipher = cipher_name(flags_d, _check_hello(hello_t))
        return SecureChannel(sock, keys.t2d, keys.d2t, keys.verifier, cipher=cipher)
    except BaseException:
        _close_quietly(sock)
        raise


class SecureChannel:
    """Records after the handshake. At most one thread sends and one thread receives at a
    time (each direction has its own key, counter and buffers)."""

    def __init__(
        self,
        sock: socket.socket,
        send_key: bytes,
        recv_key: bytes,
        verifier: str,
        idle_timeout: float | None = IDLE_TIMEOUT,
        cipher: str = "chacha20-poly1305",
    ) -> None:
        self.verifier = verifier
        self.cipher = cipher
        self._sock = sock
        if cipher not in ("aes-256-gcm", "chacha20-poly1305"):
            raise ValueError(f"unknown cipher {cipher!r}")
        aead = AESGCM if cipher == "aes-256-gcm" else ChaCha20Poly1305
        self._seal = aead(send_key)
        self._open = aead(recv_key)
        self._send_n = 0
        self._recv_n = 0
        self._dead: str | None = None
        self._peer_closing = False
        self._wbuf = bytearray(4 + MAX_RECORD)
        self._wview = memoryview(self._wbuf)
        self._pbuf = bytearray(1 + MAX_PAYLOAD)
        self._pview = memoryview(self._pbuf)
        self._rbuf = bytearray(_RBUF_LEN)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._ring = [memoryview(bytearray(1 + MAX_PAYLOAD)) for _ in range(RECV_RING)]
        # Wall seconds in the AEAD of received records (bench/ splits a receive with it).
        self.decrypt_s = 0.0
        self.settimeout(idle_timeout)

    def settimeout(self, seconds: float | None) -> None:
        """How long send/recv may block (None: forever). A recv that times out raises
        ChannelError but leaves the channel usable: partial records stay buffered."""
        self._timeout = seconds
        self._sock.settimeout(seconds)

    @property
    def socket(self) -> socket.socket:
        return self._sock

    # -- sending ---------------------------------------------------------------

    def send(self, mtype: int, payload: bytes | bytearray | memoryview = b"") -> None:
        """Send one record; `payload` at most MAX_PAYLOAD (use send_stream for bulk)."""
        n = len(payload)
        if n > MAX_PAYLOAD:
            raise ValueError(f"payload of {n} bytes exceeds {MAX_PAYLOAD}; use send_stream")
        self._pbuf[0] = _check_type(mtype)
        self._pview[1 : 1 + n] = payload
        self._seal_and_send(1 + n)

    def send_json(self, mtype: int, doc: dict[str, Any]) -> None:
        self.send(mtype, json.dumps(doc, separators=(",", ":")).encode())

    def send_stream(
        self,
        mtype: int,
        source: BinaryIO | _Readable | _ReadInto,
        size: int,
        progress: Progress | None = None,
        digest: Any = None,
    ) -> int:
        """Send exactly `size` bytes of `source` as `mtype` records of up to CHUNK bytes.

        Reads with readinto straight behind the type byte of the plaintext buffer, so the
        only copies are the file read and the AEAD. `progress(n)` gets the bytes of each
        record once it is sent; `digest` (a hashlib object), if given, is updated with them.
        ValueError if the source ends early. Returns `size`."""
        self._pbuf[0] = _check_type(mtype)
        readinto = getattr(source, "readinto", None)
        left = size
        while left > 0:
            want = min(CHUNK, left)
            window = self._pview[1 : 1 + want]
            if readinto is not None:
                got = readinto(window)
            else:
                block = source.read(want)  # type: ignore[union-attr]
                got = len(block)
                window[:got] = block
            if not got:
                raise ValueError(f"source ended {left} bytes before the declared size {size}")
            if digest is not None:
                digest.update(self._pview[1 : 1 + got])
            self._seal_and_send(1 + got)
            left -= got
            if progress is not None:
                progress(got)
        return size

    def send_error(self, reason: str, **extra: Any) -> None:
        """Best effort ERROR (messages.ERROR) then close: for a state-machine violation."""
        try:
            self.send_json(15, {"reason": reason, **extra})
        except (ChannelError, OSError):
            pass
        self.close()

    def _seal_and_send(self, plain_len: int) -> None:
        self._alive()
        if self._send_n >= MAX_RECORDS:
            self._kill("record limit reached")
            raise ChannelError("record limit reached; reconnect")
        length = plain_len + TAG_LEN
        header = length.to_bytes(4, "big")
        self._wview[0:4] = header
        end = 4 + length
        self._seal.encrypt_into(
            self._send_n.to_bytes(12, "big"),
            self._pview[:plain_len],
            header,
            self._wview[4:end],
        )
        self._send_n += 1
        try:
            self._sock.sendall(self._wview[:end])
        except TimeoutError as exc:
            # Part of a record may be on the wire: the stream cannot be continued.
            self._kill("send timed out")
            raise ChannelError(f"send timed out after {self._timeout} s") from exc
        except OSError as exc:
            self._kill(f"send failed: {exc}")
            raise ChannelError(f"connection lost while sending: {exc}") from exc
        except BaseException:
            # A signal (KeyboardInterrupt) between partial sends: the record number is
            # spent and part of the record may be out, so nothing can follow it.
            self._kill("interrupted while sending")
            raise

    # -- receiving -------------------------------------------------------------

    def recv(self) -> tuple[int, bytes]:
        """The next record (type, payload). ChannelError on a tag failure, a bad length, a
        timeout, or EOF without a closing message (truncation); ChannelClosed on EOF after
        the peer's END/REPORT/ERROR/BUSY."""
        mtype, view = self.recv_view()
        return mtype, bytes(view)

    def recv_view(self) -> tuple[int, memoryview]:
        """Like recv, without copying the payload: the view stays valid for RECV_RING - 1
        more receives (its buffer is reused after that)."""
        self._alive()
        self._fill(4)
        pos = self._rpos
        header = bytes(self._rview[pos : pos + 4])
        length = int.from_bytes(header, "big")
        # Checked before reading the body: a hostile length never sizes anything.
        if not MIN_RECORD <= length <= MAX_RECORD:
            self._kill("bad record length")
            raise ChannelError(f"bad record length {length}")
        self._fill(4 + length)
        pos = self._rpos  # _fill may have moved the record to the front of the buffer
        plain_len = length - TAG_LEN
        dview = self._ring[self._recv_n % RECV_RING]
        t0 = time.perf_counter()
        try:
            self._open.decrypt_into(
                self._recv_n.to_bytes(12, "big"),
                self._rview[pos + 4 : pos + 4 + length],
                header,
                dview[:plain_len],
            )
        except InvalidTag:
            # Dropped, reordered, replayed or altered: nothing more is sent on this channel.
            self._kill("record authentication failed")
            raise ChannelError(
                "record authentication failed (tampered, dropped or reordered data)"
            ) from None
        self.decrypt_s += time.perf_counter() - t0
        self._rpos = pos + 4 + length
        self._recv_n += 1
        if self._recv_n >= MAX_RECORDS:
            self._kill("record limit reached")
        mtype = dview[0]
        if mtype in _CLOSING_TYPES:
            self._peer_closing = True
        return mtype, dview[1:plain_len]

    def recv_json(self) -> tuple[int, dict[str, Any]]:
        mtype, view = self.recv_view()
        try:
            doc = strict_json.loads(bytes(view))
        except ValueError as exc:
            raise ChannelError(f"message type {mtype} is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ChannelError(f"message type {mtype} is not a JSON object")
        return mtype, doc

    def _fill(self, need: int) -> None:
        """Make `need` bytes available at _rpos, reading as much as the socket has."""
        while self._rend - self._rpos < need:
            avail = self._rend - self._rpos
            if self._rpos + need > _RBUF_LEN:
                # Move the partial record to the front; happens once per ~1 MiB of records.
                self._rbuf[:avail] = self._rview[self._rpos : self._rend].tobytes()
                self._rpos, self._rend = 0, avail
            try:
                got = self._sock.recv_into(self._rview[self._rend :])
            except TimeoutError as exc:
                raise ChannelError(f"no data from the peer for {self._timeout} s") from exc
            except OSError as exc:
                self._kill(f"receive failed: {exc}")
                raise ChannelError(f"connection lost while receiving: {exc}") from exc
            if not got:
                self._on_eof(avail)
            self._rend += got

    def _on_eof(self, avail: int) -> None:
        if avail == 0 and self._peer_closing:
            self._kill("peer closed")
            raise ChannelClosed("the peer closed the connection")
        self._kill("truncated")
        where = "inside a record" if avail else "without END"
        raise ChannelError(f"the connection was closed {where}: the stream is truncated")

    # -- lifecycle -------------------------------------------------------------

    def _alive(self) -> None:
        if self._dead is not None:
            raise ChannelError(f"the channel is closed ({self._dead})")

    def _kill(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        _close_quietly(self._sock)

    def close(self) -> None:
        self._kill("closed")

    def __enter__(self) -> SecureChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Keys:
    """HKDF-SHA256 of the SPAKE2 key: salt instance_id, info label | transcript hash."""

    def __init__(self, key: bytes, instance_id: bytes, transcript: bytes) -> None:
        def derive(label: bytes) -> bytes:
            info = b"spk-deploy/v1 " + label + b" " + transcript
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=instance_id, info=info).derive(
                key
            )

        self.d2t = derive(b"donor->target")
        self.t2d = derive(b"target->donor")
        self.confirm = derive(b"confirm")
        self.transcript = transcript
        number = int.from_bytes(derive(b"verifier")[:8], "big") % 10_000
        self.verifier = f"{number:04d}"

    def confirmation(self, who: bytes) -> bytes:
        return hmac.new(self.confirm, who + self.transcript, hashlib.sha256).digest()


def _transcript(
    hello_d: bytes,
    hello_t: bytes,
    params: bytes,
    msg_a: bytes,
    msg_b: bytes,
    nameplate: str,
    epoch: int,
) -> bytes:
    """SHA-256 over every handshake field, each length-prefixed so fields cannot shift."""
    h = hashlib.sha256(b"spk-deploy/v1 transcript")
    for part in (hello_d, hello_t, params, msg_a, msg_b, nameplate.encode(), str(epoch).encode()):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def _finish(pake: Any, message: bytes) -> bytes:
    try:
        key: bytes = pake.finish(message)
    except Exception as exc:  # spake2 raises ValueError or its own errors for bad elements
        raise ChannelError(f"bad SPAKE2 message from the peer: {exc}") from None
    return key


def _check_hello(data: bytes) -> int:
    magic, version, flags = _HELLO.unpack(data)
    if magic != MAGIC:
        raise ChannelError("the peer is not a spk-deploy endpoint (bad hello)")
    if version != VERSION:
        raise ChannelError(f"the peer speaks deploy protocol version {version}, we speak {VERSION}")
    return int(flags)


def _check_type(mtype: int) -> int:
    if not 0 <= mtype <= 255:
        raise ValueError(f"message type {mtype} does not fit a byte")
    return mtype


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _busy_wait(wire: _Wire) -> float | None:
    """The seconds of wrong-code wait a busy target announced after its hello, if any
    (a target serving another donor sends nothing more and closes)."""
    wait, reason = _wait_note(wire)
    return wait if reason == "wrong_code_wait" else None


# Why a target that refused us said it did, in the note after its hello.
WAIT_REASONS = ("wrong_code_wait", "code_used_up")


def _wait_note(wire: _Wire) -> tuple[float | None, str | None]:
    """The seconds left and the reason a refusing target announced after its hello, if it
    sent that note. Unauthenticated: only ever shown, and clamped."""
    try:
        doc = strict_json.loads(wire.recv_blob())
    except (ChannelError, ValueError):
        return None, None
    if not isinstance(doc, dict) or doc.get("reason") not in WAIT_REASONS:
        return None, None
    wait = doc.get("retry_after")
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait):
        return None, None
    # Shown to a person: an absurd figure from a stranger on the LAN is clamped.
    return min(max(float(wait), 0.0), 3600.0), str(doc["reason"])


class _Wire:
    """Blocking exact reads and 2-byte-length blobs under one deadline for the handshake."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ChannelError(f"handshake timed out after {self.timeout} s")
        self.sock.settimeout(left)

    def send(self, data: bytes) -> None:
        self._arm()
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise ChannelError(f"handshake timed out after {self.timeout} s") from None
        except OSError as exc:
            raise ChannelError(f"connection lost during the handshake: {exc}") from None

    def send_blob(self, blob: bytes) -> None:
        self.send(len(blob).to_bytes(2, "big") + blob)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            self._arm()
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise ChannelError(f"handshake timed out after {self.timeout} s") from None
            except OSError as exc:
                raise ChannelError(f"connection lost during the handshake: {exc}") from None
            if not k:
                raise ChannelError("the peer closed the connection during the handshake")
            got += k
        return bytes(buf)

    def recv_blob(self) -> bytes:
        n = int.from_bytes(self.recv_exact(2), "big")
        if n > MAX_HANDSHAKE_BLOB:
            raise ChannelError(f"handshake message of {n} bytes (limit {MAX_HANDSHAKE_BLOB})")
        return self.recv_exact(n)
