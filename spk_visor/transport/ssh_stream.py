"""Run a command on a node over SSH and stream bytes into its stdin, fast.

`ota push` sends a bundle of hundreds of MB this way into ``spk-visor ota apply --bundle -``
while the node prints NDJSON progress (design/ota.md, "Push mode"). The connection, host key
policy and ~/.ssh/config handling are `spk_visor.transport.ssh`'s (one pooled connection per
node); this module adds the exec channel and the data pump.

Why it is shaped this way (measured in bench/ota_push.py, design/ota.md "Pushing fast over
SSH"):

- An exec channel, not SFTP: paramiko's SFTP put ran at 115-118 MB/s where OpenSSH's scp
  ran at 270-330 (design/ota.md); a channel carries the bytes with no per-request
  acknowledgements, and the node verifies as it reads.
- Reads of 1 MiB from the source, handed to `Channel.send` as memoryviews. paramiko's
  `Channel.sendall` re-slices the remaining buffer after every 32 KiB packet, so a large
  buffer is copied over and over (quadratic in the buffer size). paramiko accepts any
  buffer there (its Message writes it into a BytesIO), though its stubs say bytes.
- TCP_NODELAY and the aes128-gcm cipher are set where the connection is made (ssh.py).
- stdout and stderr are drained by their own threads while the pump writes: a remote that
  fills its output window while we still send would otherwise stop reading its stdin, and
  both sides would wait on each other forever.
- `hold`: the stream can stop one byte short of its end and wait there for a go. `ota push`
  sends a bundle ahead to the next nodes while the canary applies; a node that reads all
  but the last byte has verified almost everything and still waits, and when the go never
  comes the stream ends there: the node sees a truncated bundle, refuses it (exit 3) and
  keeps nothing (design/ota.md: nothing is persisted before the whole bundle checked out).
  A byte and not only the EOF is held back: with every byte there, a channel that closes
  (the workstation dies) would end a complete bundle, and the node would apply it.
"""

from __future__ import annotations

import logging
import shlex
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO, NamedTuple, Protocol, cast

import paramiko

from spk_visor.config import SshSpec
from spk_visor.errors import TransportError, UsageError
from spk_visor.transport import ssh

log = logging.getLogger(__name__)

# Bytes read from the source per call: large enough that file reads and progress callbacks
# cost nothing next to the packet work, small enough for a smooth progress bar.
READ_CHUNK = 1 << 20
# The output kept per stream: the tail, since error messages come last. Lines go to the
# callback as they arrive whatever the cap.
MAX_CAPTURE = 4 << 20
# A line longer than this is handed over in parts rather than buffered without bound.
MAX_LINE = 1 << 20
# After the exit status arrives, how long to wait for the output to end. A remote command
# that leaves a background process holding its stdout (a detached worker that did not
# close it) would otherwise keep the channel, and us, open until that process ends.
DRAIN_GRACE = 5.0
# exit_status when the command ended without one (killed by a signal: paramiko does not
# decode exit-signal).
NO_STATUS = -1
# Bytes kept back by a `hold` until it says go: one is enough to keep the stream incomplete.
HOLD_BACK = 1
# How often a held stream checks whether the remote command ended on its own meanwhile.
HOLD_POLL = 0.1
# A held stream carries nothing for as long as the canary takes (minutes): keepalives
# every this many seconds stop a NAT or firewall from dropping the idle connection.
HOLD_KEEPALIVE = 30


class Hold(Protocol):
    """Decides whether a held stream is completed (see exec_stream's `hold`)."""

    def wait(self, timeout: float) -> bool | None:
        """True: send the rest; False: end the stream without it; None: not decided yet
        after `timeout` seconds (asked again)."""


class ExecResult(NamedTuple):
    """How a remote command ended: its exit status (NO_STATUS if killed by a signal), the
    tail (up to MAX_CAPTURE bytes) of its stdout and stderr, and whether its stdin was cut
    short because the `hold` said no."""

    exit_status: int
    stdout: bytes
    stderr: bytes
    cut: bool = False


class _Output:
    """One output stream: a bounded tail buffer, and complete lines to a callback."""

    def __init__(self, on_line: Callable[[str], None] | None) -> None:
        self.on_line = on_line
        self.tail = bytearray()
        self.partial = bytearray()
        self.error: BaseException | None = None

    def feed(self, data: bytes) -> None:
        self.tail += data
        if len(self.tail) > MAX_CAPTURE:
            del self.tail[: len(self.tail) - MAX_CAPTURE]
        if self.on_line is None or self.error is not None:
            return
        self.partial += data
        *lines, rest = self.partial.split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = bytearray()
        self.partial = bytearray(rest)
        for line in lines:
            self._deliver(bytes(line))

    def finish(self) -> None:
        if self.partial and self.on_line is not None and self.error is None:
            self._deliver(bytes(self.partial))
        self.partial = bytearray()

    def _deliver(self, line: bytes) -> None:
        if self.on_line is None:
            return
        try:
            self.on_line(line.decode("utf-8", errors="replace").rstrip("\r"))
        except BaseException as e:  # re-raised in the caller's thread by exec_stream
            self.error = e


def _drain(recv: Callable[[int], bytes], out: _Output, stop: threading.Event) -> None:
    """Read one stream until EOF (or until told to stop after a timeout wakes us)."""
    while True:
        try:
            data = recv(65536)
        except TimeoutError:
            if stop.is_set():
                break
            continue
        except (OSError, EOFError, paramiko.SSHException):
            break
        if not data:
            break
        out.feed(data)
    out.finish()


def _pump(
    channel: paramiko.Channel,
    source: BinaryIO,
    size: int | None,
    progress: Callable[[int], None] | None,
    address: str,
    timeout: float,
    hold: Hold | None = None,
) -> bool:
    """Copy `source` (at most `size` bytes) into the channel until EOF or the remote stops.
    With `hold`, stop HOLD_BACK bytes short and send them only if it says go.

    Returns early, without error, when the remote command exits or closes the channel: its
    exit status says what happened. Returns True when the hold said no (the rest was not
    sent), else False.
    """
    if hold is None or size is None:
        _send(channel, source, size, 0, progress, address, timeout)
        return False
    ahead = size - min(HOLD_BACK, size)
    transport = channel.get_transport()
    if transport is not None:
        transport.set_keepalive(HOLD_KEEPALIVE)
    if not _send(channel, source, ahead, 0, progress, address, timeout):
        return False  # the command is over already
    while True:
        if channel.exit_status_ready():
            return False  # ended by itself (refused what it read): its status says why
        go = hold.wait(HOLD_POLL)
        if go is False:
            return True
        if go:
            _send(channel, source, size, ahead, progress, address, timeout)
            return False


def _send(
    channel: paramiko.Channel,
    source: BinaryIO,
    size: int | None,
    done: int,
    progress: Callable[[int], None] | None,
    address: str,
    timeout: float,
) -> bool:
    """Send `source` from byte `done` up to `size` (None: its EOF); False if the remote
    stopped reading first."""
    while size is None or done < size:
        want = READ_CHUNK if size is None else min(READ_CHUNK, size - done)
        data = source.read(want)
        if not data:
            if size is not None:
                raise UsageError(
                    f"the data to send ended after {done} of {size} bytes",
                    "was the file changed while it was being sent?",
                )
            return True
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            if channel.exit_status_ready():
                return False  # the command is over; what it did not read is not wanted
            try:
                # A view, not a slice: `send` takes one packet's worth (what the window
                # and the server's packet size allow) and copies just that; slicing the
                # bytes would copy the whole rest of the chunk on every packet.
                sent = channel.send(cast(bytes, view[offset:]))
            except TimeoutError as e:
                raise TransportError(
                    f"{address}: the remote command read nothing for {timeout:g} s",
                    "the node may be overloaded or stuck; raise --timeout",
                ) from e
            except (OSError, EOFError, paramiko.SSHException):
                return False  # channel closed: the exit status (or its absence) tells why
            if sent == 0:
                return False  # the remote side closed or sent EOF
            offset += sent
        done += len(data)
        if progress is not None:
            progress(done)
    return True


def exec_stream(
    spec: SshSpec,
    argv: Sequence[str],
    source: BinaryIO | None,
    *,
    size: int | None,
    progress: Callable[[int], None] | None = None,
    timeout: float,
    accept_new: bool,
    on_stdout_line: Callable[[str], None] | None = None,
    wait_timeout: float | None = None,
    hold: Hold | None = None,
) -> ExecResult:
    """Run `argv` on the node and stream `source` into its stdin, then EOF.

    The remote sshd hands the command to the login shell, so `argv` is joined with
    shell quoting: each element arrives as one word, whatever it contains.

    `size`: send exactly this many bytes (an error if the source ends before); None: until
    the source's EOF. `progress(n)` gets the total bytes sent so far, after each chunk.
    `on_stdout_line` gets each stdout line (no newline) as it arrives, from another
    thread. `timeout` bounds connecting and any stall while sending; `wait_timeout`
    (default: `timeout`) bounds the wait for the command to exit after its stdin closed.

    `hold` (needs `size`): send all but the last HOLD_BACK bytes, then ask `hold.wait`
    until it decides; go sends the rest, no ends the stream there (`cut` in the result).
    No time limit applies while held; a command that exits meanwhile ends the wait.

    If the command exits before reading everything, sending stops and its exit status is
    returned. Raises TransportError (exit 7) when the node cannot be reached, the
    connection drops, or a time limit passes; HostKeyError (exit 3) for an unknown or
    changed host key; AuthError (exit 2) when the login is refused.
    """
    if not argv:
        raise ValueError("exec_stream needs a command")
    command = shlex.join(argv)
    with ssh.session(spec, timeout, accept_new) as (endpoint, channel):
        address = f"ssh://{endpoint}"
        channel.settimeout(timeout)
        try:
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TransportError(f"{address}: cannot run {argv[0]}: {e}") from e
        stdout, stderr = _Output(on_stdout_line), _Output(None)
        stop = threading.Event()
        readers = [
            threading.Thread(target=_drain, args=(recv, out, stop), name=f"ssh-{name}", daemon=True)
            for name, recv, out in (
                ("stdout", channel.recv, stdout),
                ("stderr", channel.recv_stderr, stderr),
            )
        ]
        for reader in readers:
            reader.start()
        cut = False
        try:
            if source is not None:
                cut = _pump(channel, source, size, progress, address, timeout, hold)
            try:
                channel.shutdown_write()  # EOF: the command sees the end of its stdin
            except (OSError, EOFError, paramiko.SSHException):
                pass  # already closed by the remote; the exit status says the rest
            status = _wait_exit(channel, wait_timeout or timeout, address, argv[0])
        except BaseException:
            channel.close()  # an error or Ctrl-C: wake the readers now, not at EOF
            raise
        finally:
            stop.set()
            for reader in readers:
                reader.join(DRAIN_GRACE)
            if any(reader.is_alive() for reader in readers):
                log.debug("%s: output still open after exit; closing the channel", address)
                channel.close()  # wakes the readers: their buffers close
                for reader in readers:
                    reader.join(DRAIN_GRACE)
        for out in (stdout, stderr):
            if out.error is not None:
                raise out.error
        return ExecResult(status, bytes(stdout.tail), bytes(stderr.tail), cut)


def _wait_exit(channel: paramiko.Channel, wait: float, address: str, name: str) -> int:
    if not channel.status_event.wait(wait):
        raise TransportError(
            f"{address}: {name} did not finish within {wait:g} s",
            "the node may be overloaded or stuck; raise the time limit",
        )
    status = channel.exit_status
    if status == NO_STATUS:
        # paramiko also sets the event when the channel closes without a status: either
        # the connection dropped, or the command died from a signal.
        transport = channel.get_transport()
        if transport is None or not transport.is_active():
            raise TransportError(f"{address}: the SSH connection dropped while {name} ran")
    return status


def run(
    spec: SshSpec,
    argv: Sequence[str],
    *,
    timeout: float,
    accept_new: bool,
    wait_timeout: float | None = None,
    on_stdout_line: Callable[[str], None] | None = None,
) -> ExecResult:
    """Run `argv` on the node with an empty stdin; see `exec_stream`."""
    return exec_stream(
        spec,
        argv,
        None,
        size=None,
        timeout=timeout,
        accept_new=accept_new,
        on_stdout_line=on_stdout_line,
        wait_timeout=wait_timeout,
    )


__all__ = ["HOLD_BACK", "NO_STATUS", "ExecResult", "Hold", "exec_stream", "run"]
