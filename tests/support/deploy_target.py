"""A deploy receiver in its own process on loopback, and the people who talk to it.

`python -m tests.support.deploy_target '{"policy": {...}}'` runs spk_visor.deploy.receiver
without a disk to install to (a donor that gets through the handshake is served its HELLO
and then hangs up) and prints the receiver's events as JSON lines. The hostile tests and
bench/deploy_hostile.py drive it with:

- `Target`: the process, its events, its current code;
- `Attacker`: threads from one loopback address that hold silent sockets, reopen them, or
  try wrong codes nonstop;
- `donor_handshake`: a real donor handshake in a fresh process from another loopback
  address, timed from its connect() to key confirmation.

Loopback has all of 127.0.0.0/8, so each party gets its own source address without root.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TARGET_ADDRESS = "127.0.0.1"
DONOR_ADDRESS = "127.0.0.2"
ATTACKER_ADDRESS = "127.0.0.9"

DONOR_SCRIPT = """
import json, socket, sys, time
from spk_visor.deploy import channel
a = json.loads(sys.argv[1])
out = {"ok": False}
start = time.monotonic()
try:
    s = socket.create_connection((a["host"], a["port"]), timeout=a["timeout"],
                                 source_address=(a["source"], 0))
    chan = channel.donor_handshake(s, a["code"], None, None, timeout=a["timeout"])
    out = {"ok": True, "verifier": chan.verifier}
    chan.close()
except channel.WrongCode as e:
    out["error"] = "wrong_code: " + str(e)
except channel.Limited as e:
    out["error"] = "limited: " + str(e)
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _serve(args: dict[str, Any]) -> int:
    """The receiver process (run through __main__)."""
    from spk_visor.deploy import guard, receiver  # noqa: PLC0415
    from spk_visor.trust import roots  # noqa: PLC0415
    from tests.support.ota_pki import Pki  # noqa: PLC0415

    root = roots.load_anchor(Pki().root_env().to_bytes(), "test root")
    lock = threading.Lock()

    def emit(event: str, doc: dict[str, Any]) -> None:
        with lock:
            line = json.dumps({"event": event, "time": time.time(), **doc}, default=str)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    kw: dict[str, Any] = {}
    if "policy" in args:
        kw["policy"] = guard.Policy(**args["policy"])
    options = receiver.Options(
        trust_root=root,
        mountpoint=Path(args["mountpoint"]),
        port=0,
        bind=TARGET_ADDRESS,
        announce=False,
        nameplate="42",
        **kw,
    )
    r = receiver.Receiver(options, emit)
    signal.signal(signal.SIGTERM, lambda *_: r.stop())
    return r.serve()


class NdjsonEvents:
    """The NDJSON events a process prints on stdout, gathered by a reader thread, so a test
    can wait for one (a receiver's code, a phase, a refusal). Subclasses set `self.proc`
    (stdout and stderr piped) and call `_start_events()`."""

    proc: subprocess.Popen[bytes]

    def _start_events(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.events.append(doc)
                self.cond.notify_all()

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for event in self.events[seen:]:
                    if pred(event):
                        return event
                seen = len(self.events)
                left = deadline - time.monotonic()
                exited = self.proc.poll() is not None
                if left <= 0 or exited:
                    err = self.proc.stderr.read().decode() if exited and self.proc.stderr else ""
                    raise AssertionError(f"no such event; got {self.events[-20:]} {err[-2000:]}")
                self.cond.wait(min(left, 0.5))

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.events if e["event"] == name]


class Target(NdjsonEvents):
    """The receiver process and its events, in order."""

    def __init__(self, tmp: Path, policy: dict[str, Any] | None = None) -> None:
        args: dict[str, Any] = {"mountpoint": str(tmp / "mnt")}
        if policy is not None:
            args["policy"] = policy
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.deploy_target", json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env(),
            cwd=REPO,
        )
        self._start_events()
        self.wait(lambda e: e["event"] == "code", 30)
        self.port = int(self.named("code")[-1]["port"])

    @property
    def code(self) -> str:
        return str(self.named("code")[-1]["code"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then the exit status and stderr (a traceback there is a crash)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.reader.join(timeout=10)
        err = self.proc.stderr.read().decode() if self.proc.stderr is not None else ""
        return int(self.proc.returncode), err


def donor_handshake(
    port: int, code: str, source: str = DONOR_ADDRESS, timeout: float = 10.0
) -> dict[str, Any]:
    """A donor handshake in its own process: {"ok", "seconds", "error"?}."""
    args = {"host": TARGET_ADDRESS, "port": port, "code": code, "source": source,
            "timeout": timeout}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", DONOR_SCRIPT, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        env=env(),
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        return {"ok": False, "error": f"donor process failed: {done.stderr[-1000:]}"}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def wrong_code(code: str) -> str:
    nameplate, secret = code.split("-")
    first = "0" if secret[0] != "0" else "1"
    return f"{nameplate}-{first}{secret[1:]}"


class Attacker:
    """Threads from one source address doing one hostile thing until stop()."""

    def __init__(
        self, port: int, source: str = ATTACKER_ADDRESS, host: str = TARGET_ADDRESS
    ) -> None:
        self.port = port
        self.source = source
        self.host = host
        self.halt = threading.Event()
        self.threads: list[threading.Thread] = []
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        self.connects = 0
        self.guesses: list[float] = []  # when a wrong-code attempt reached confirmation
        self.outcomes: dict[str, int] = {}

    def _connect(self, timeout: float = 5.0) -> socket.socket | None:
        try:
            s = socket.create_connection(
                (self.host, self.port), timeout=timeout, source_address=(self.source, 0)
            )
        except OSError:
            return None
        with self.lock:
            self.connects += 1
        return s

    def hold_idle(self, n: int) -> None:
        """Open `n` sockets that never send anything and keep them open."""
        for _ in range(n):
            s = self._connect()
            if s is not None:
                self.held.append(s)

    def reopen_silent(self, threads: int, hold: float = 30.0) -> None:
        """`threads` loops: connect, send nothing, keep it until the target closes it (or
        `hold` s), then connect again."""

        def loop() -> None:
            while not self.halt.is_set():
                s = self._connect()
                if s is None:
                    self.halt.wait(0.01)
                    continue
                s.settimeout(0.2)
                end = time.monotonic() + hold
                try:
                    while not self.halt.is_set() and time.monotonic() < end:
                        try:
                            if not s.recv(4096):
                                break
                        except TimeoutError:
                            continue
                except OSError:
                    pass
                finally:
                    s.close()

        self._start(loop, threads)

    def guess_nonstop(self, code_of: Callable[[], str], threads: int = 1) -> None:
        """Wrong codes as fast as the target answers, each a full donor handshake."""
        from spk_visor.deploy import channel  # noqa: PLC0415

        def loop() -> None:
            while not self.halt.is_set():
                s = self._connect()
                if s is None:
                    self.halt.wait(0.01)
                    continue
                try:
                    channel.donor_handshake(s, wrong_code(code_of()), None, None, timeout=10)
                    outcome = "got_in"
                except channel.WrongCode:
                    outcome = "wrong_code"
                    with self.lock:
                        self.guesses.append(time.monotonic())
                except channel.Limited:
                    outcome = "limited"
                except channel.Busy:
                    outcome = "busy"
                except (channel.ChannelError, OSError):
                    outcome = "failed"
                with self.lock:
                    self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
                if outcome != "wrong_code":
                    self.halt.wait(0.05)

        self._start(loop, threads)

    def _start(self, fn: Callable[[], None], n: int) -> None:
        for _ in range(n):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(timeout=15)
        for s in self.held:
            s.close()
        self.held.clear()


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
