"""The target side of a deploy (design/deploy.md): show a code, serve one donor at a time.

    listen -> hello/SPAKE2/confirm (target_handshake) -> HELLO inventory -> PLAN
    -> PLAN_OK | PLAN_REFUSED -> Installer.prepare -> FILE_BEGIN/DATA/FILE_END ... -> END
    -> Installer.finalize -> REPORT -> REBOOT

The accept loop never waits on a peer: it counts the connection against its source
address (guard.py: at most a few per address, a cap in all; over that the connection is
reset at once) and hands it to a worker thread, which runs the handshake under its own
deadline. Handshakes run side by side, so a silent or slow peer delays nobody else; only
an authenticated donor takes the single session slot. A connection while a donor is being
served gets BUSY. Code attempts are budgeted per source address and per code (guard.py,
docs/deploy-security.md): an address over its budget, or anyone once the code is used up,
gets a "limited" hello before any PAKE; a used-up code rotates (new secret, epoch + 1, new
instance id) once it has been on screen for the policy's minimum life.

Resume: the journal (plan digest, manifest hash, disk serial, verified blobs, the prepared
Installer) lives in RAM for the life of this process. A connection that drops after the
disk was prepared leaves the state `resumable`; a donor that sends the *same* PLAN skips
partitioning and every blob already verified. Any other failure aborts the install (the
Installer leaves the disk unbootable) and goes back to `waiting`. The bootloader is only
written by `finalize`, after every blob verified, so no failure before it boots anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spk_visor import strict_json
from spk_visor.deploy import channel, code, discovery, guard, install, inventory, messages
from spk_visor.errors import OperatorNeededError, TransportError, UsageError
from spk_visor.install import image as image_writer
from spk_visor.install import runner
from spk_visor.trust.roots import Root

Emit = Callable[[str, dict[str, Any]], None]

DATA_RECORD = 64 << 10
PROGRESS_EVERY = 1.0
# Refusals (reset, busy, limited) are shown at most this often per kind and address, with
# a count: an attacker must not be able to flood the screen or the JSON log.
NOTICE_EVERY = 5.0
# The donor has this long between records once authenticated; the handshake has its own.
IDLE_TIMEOUT = 120.0


class _RebootFailed(OperatorNeededError):
    """The reboot command could not run, timed out or exited non-zero."""


class SessionFailed(TransportError):
    """The deploy failed for `reason`; `resumable` when the prepared disk may be reused."""

    def __init__(self, reason: str, *, resumable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.resumable = resumable


@dataclass
class Options:
    trust_root: Root
    mountpoint: Path
    port: int = channel.PORT
    bind: str = "0.0.0.0"  # noqa: S104 (a shim serves whatever LAN it booted on)
    discovery_port: int = channel.DISCOVERY_PORT
    announce: bool = True
    nameplate: str | None = None
    allow_loop: bool = False
    disk_policy: frozenset[str] = frozenset()
    reboot_cmd: Sequence[str] = ("reboot",)
    once: bool = False
    policy: guard.Policy = field(default_factory=guard.Policy)
    handshake_timeout: float = 10.0


@dataclass
class Journal:
    """What survives a dropped connection, in RAM only."""

    plan_digest: str
    manifest_sha256: str
    disk_serial: str
    blobs: dict[str, int]
    installer: install.Installer
    verified: set[str] = field(default_factory=set)

    def state(self) -> dict[str, Any]:
        return {
            "manifest_sha256": self.manifest_sha256,
            "disk_serial": self.disk_serial,
            "verified": sorted(self.verified),
        }


def plan_digest(plan: dict[str, Any]) -> str:
    """A PLAN's identity: the same bytes were already validated, so a resume may skip that."""
    canonical = json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


class Receiver:
    def __init__(self, options: Options, emit: Emit) -> None:
        self.options = options
        self.emit = emit
        self.code = code.new_code(options.nameplate)
        self.instance_id = secrets.token_bytes(16)
        self.guard = guard.Guard(options.policy)
        self.guard.rotated(self.code.epoch)
        self.state = "waiting"
        self.journal: Journal | None = None
        self.deploys = 0
        self._busy = threading.Lock()
        # The HELLO inventory started during a handshake: at most one at a time.
        self._inventory: Future[list[inventory.Disk]] | None = None
        self._inventory_lock = threading.Lock()
        self._code_lock = threading.Lock()  # code and instance_id change together
        self._stop = threading.Event()
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()
        self._notices: dict[tuple[str, str], tuple[float, int]] = {}
        self._locked_shown = False
        self._listener: socket.socket | None = None
        self._announcer: discovery.Announcer | None = None
        self.session: _Session | None = None

    # -- the screen -------------------------------------------------------------------

    def show_code(self) -> None:
        disks = inventory.inventory(allow_loop=self.options.allow_loop)
        self.emit(
            "code",
            {
                "code": str(self.code),
                "nameplate": self.code.nameplate,
                "epoch": self.code.epoch,
                "port": self.port,
                "state": self.state,
                "disks": [
                    {"name": d.name, "serial": d.serial, "size": d.size, "model": d.model}
                    for d in disks
                    if d.eligible
                ],
            },
        )

    def set_state(self, state: str) -> None:
        self.state = state
        if self._announcer is not None:
            self._announcer.update(state=state)
        self.emit("state", {"state": state})

    @property
    def port(self) -> int:
        if self._listener is None:
            return self.options.port
        return int(self._listener.getsockname()[1])

    # -- the accept loop --------------------------------------------------------------

    def serve(self) -> int:
        """Serve donors until `stop()` (or, with `once`, one successful deploy)."""
        try:
            listener = socket.create_server(
                (self.options.bind, self.options.port), reuse_port=False
            )
        except OSError as e:
            # A second receiver, another service on the port, an address not on this
            # machine: the operator's to fix (exit 2), not an internal error.
            raise UsageError(
                f"cannot listen on {self.options.bind}:{self.options.port}: {e.strerror or e}",
                "is another `deploy receive` running? stop it, or pass another --port/--bind",
            ) from e
        listener.settimeout(0.5)
        self._listener = listener
        try:
            if self.options.announce:
                self._announcer = discovery.Announcer(
                    nameplate=self.code.nameplate,
                    epoch=self.code.epoch,
                    instance_id=self.instance_id,
                    port=self.port,
                    boot_mode=_boot_mode(),
                    mac=_first_mac(),
                    discovery_port=self.options.discovery_port,
                )
            self.show_code()
            while not self._stop.is_set():
                self._tick()
                try:
                    conn, addr = listener.accept()
                except TimeoutError:
                    continue
                except OSError as e:
                    # Out of descriptors or memory: back off a little, keep serving.
                    self._notice("accept_failed", "", {"reason": str(e)})
                    self._stop.wait(0.1)
                    continue
                self._admit(conn, str(addr[0]))
            with self._workers_lock:
                workers = list(self._workers)
            for worker in workers:
                worker.join(timeout=30)
        finally:
            listener.close()
            if self._announcer is not None:
                self._announcer.stop()
            if self.journal is not None:
                self._abort("the receiver stopped")
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _admit(self, conn: socket.socket, address: str) -> None:
        """Called by the accept loop: never blocks on the peer."""
        if not self.guard.open(address):
            _reset(conn)
            self._notice("connection_reset", address, {"from": address})
            return
        worker = threading.Thread(target=self._connection_thread, args=(conn, address), daemon=True)
        with self._workers_lock:
            self._workers.add(worker)
        try:
            worker.start()
        except RuntimeError as e:  # no more threads: drop this one, keep serving
            with self._workers_lock:
                self._workers.discard(worker)
            self.guard.close(address)
            _reset(conn)
            self._notice("accept_failed", "", {"reason": str(e)})

    def _tick(self) -> None:
        """Accept-loop housekeeping: a used-up code rotates once its minimum life is over."""
        if self.guard.rotation_due():
            with self._code_lock:
                self._rotate()
        elif self.guard.used_up() and not self._locked_shown:
            self._locked_shown = True
            wait = self.guard.retry_after("")
            self.emit(
                "code_locked",
                {
                    "failures": self.guard.code_failures,
                    "seconds": round(wait, 1),
                    "message": f"too many wrong codes: attempts refused, a new code shows "
                    f"in {wait:.0f} s",
                },
            )

    def _notice(self, event: str, address: str, doc: dict[str, Any]) -> None:
        """Emit `event` for `address` at most every NOTICE_EVERY s, with a count."""
        now = time.monotonic()
        key = (event, address)
        with self._workers_lock:
            last, count = self._notices.get(key, (float("-inf"), 0))
            count += 1
            if now - last < NOTICE_EVERY:
                self._notices[key] = (last, count)
                return
            if len(self._notices) > 1024:
                self._notices.clear()
            self._notices[key] = (now, 0)
        self.emit(event, {**doc, "count": count})

    def _connection_thread(self, conn: socket.socket, address: str) -> None:
        done = False
        try:
            done = self._connection(conn, address)
        except Exception as e:  # a bug must not kill the receiver: show it, keep serving
            self.emit("error", {"from": address, "reason": f"internal: {type(e).__name__}: {e}"})
        finally:
            conn.close()
            self.guard.close(address)
            with self._workers_lock:
                self._workers.discard(threading.current_thread())
        if done and self.options.once:
            self._stop.set()

    def _connection(self, conn: socket.socket, address: str) -> bool:
        """One connection, in its own worker: refusals, handshake, then maybe the session."""
        if self._busy.locked():
            self._notice("busy_refused", address, {"from": address})
            channel.refuse_busy(conn)  # closes it
            return False
        why = self.guard.refusal(address)
        if why is not None:
            self._refuse_limited(conn, address, why)
            return False
        disks: list[Future[list[inventory.Disk]]] = []
        chan = self._handshake(conn, address, disks)
        if chan is None:
            return False
        if not self._busy.acquire(blocking=False):
            # Another donor with the code authenticated a moment earlier.
            self._notice("busy_refused", address, {"from": address})
            _send_busy_record(chan)
            return False
        try:
            return self._session(chan, address, disks[0] if disks else None)
        finally:
            self._busy.release()

    def _refuse_limited(self, conn: socket.socket, address: str, why: str) -> None:
        wait = self.guard.retry_after(address)
        who = "this address" if why == guard.SOURCE_LIMITED else "anyone (code used up)"
        self._notice(
            "limited",
            address,
            {
                "from": address,
                "why": why,
                "seconds": round(wait, 1),
                "message": f"code attempt from {address} refused: no attempts for {who} "
                f"for {wait:.0f} s",
            },
        )
        # The note after the hello says which wait and for how long: the operator who typed
        # the right code right after a wrong one is told to wait, not to look elsewhere.
        channel.send_busy(
            conn,
            flags=channel.FLAG_LIMITED,
            retry_after=wait,
            reason="wrong_code_wait" if why == guard.SOURCE_LIMITED else "code_used_up",
        )  # closes it

    # -- one donor --------------------------------------------------------------------

    def _handshake(
        self,
        conn: socket.socket,
        address: str,
        disks: list[Future[list[inventory.Disk]]],
    ) -> channel.SecureChannel | None:
        """The handshake; None when it failed. An admitted code attempt also starts the
        HELLO's inventory into `disks` (see _inventory_soon)."""
        with self._code_lock:
            current, instance_id = self.code, self.instance_id
        admitted = False
        ended = False

        def admit() -> bool:
            nonlocal admitted
            admitted = self.guard.begin(address, current.epoch)
            if admitted:
                soon = self._inventory_soon()
                if soon is not None:
                    disks.append(soon)
            return admitted

        def end(wrong: bool) -> None:
            nonlocal ended
            if admitted and not ended:
                ended = True
                self.guard.end(address, wrong=wrong)

        try:
            chan = channel.target_handshake(
                conn,
                current,
                instance_id,
                timeout=self.options.handshake_timeout,
                admit=admit,
                # Counted before the donor hears the verdict: a donor that retries at once
                # must find this address in its wrong-code wait, not still mid-attempt.
                on_wrong_code=lambda: end(wrong=True),
            )
        except channel.WrongCode:
            end(wrong=True)
            self._wrong_code(address)
            return None
        except (channel.ChannelError, OSError) as e:
            end(wrong=False)
            self._notice("handshake_failed", address, {"from": address, "reason": str(e)})
            return None
        except BaseException:
            end(wrong=False)
            raise
        end(wrong=False)
        return chan

    def _inventory_soon(self) -> Future[list[inventory.Disk]] | None:
        """The HELLO's disk inventory, on its own thread from the moment a code attempt is
        admitted: lsblk and the wipefs probes (tens of ms of process starts) run while both
        sides compute SPAKE2, instead of after it. Only an authenticated donor is sent the
        result; a wrong code drops it.

        Admission needs no code (it comes with the donor's SPAKE2 message) and a hang-up
        after it costs no guess, so a stranger can loop on it: at most one inventory runs
        at a time (an attempt admitted while one runs shares it, its answer at most one
        inventory old), and none starts while a session owns the disks (None: that HELLO,
        if the attempt ever gets one, takes its own). Hang-ups cannot pile up lsblk and
        wipefs runs behind a slow disk, nor probe disks during another donor's wipe."""
        with self._inventory_lock:
            if self._busy.locked():
                return None
            running = self._inventory
            if running is not None and not running.done():
                return running
            future: Future[list[inventory.Disk]] = Future()
            self._inventory = future

        def run() -> None:
            try:
                future.set_result(inventory.inventory(allow_loop=self.options.allow_loop))
            except BaseException as e:  # handed to the session, which reports it
                future.set_exception(e)

        threading.Thread(target=run, name="hello-inventory", daemon=True).start()
        return future

    def _wrong_code(self, address: str) -> None:
        attempt = self.guard.source_failures(address)
        limit = self.options.policy.source_guesses
        self.emit(
            "wrong_code",
            {
                "from": address,
                "attempt": attempt,
                "max": limit,
                "code_failures": self.guard.code_failures,
                "message": f"wrong code attempt from {address} ({attempt}/{limit})",
            },
        )

    def _rotate(self) -> None:
        """A new code (caller holds _code_lock)."""
        self.code = code.new_code(self.code.nameplate, epoch=self.code.epoch + 1)
        self.instance_id = secrets.token_bytes(16)
        self.guard.rotated(self.code.epoch)
        self._locked_shown = False
        if self._announcer is not None:
            self._announcer.update(epoch=self.code.epoch, instance_id=self.instance_id)
        self.emit("code_rotated", {"epoch": self.code.epoch})
        self.show_code()

    def _session(
        self,
        chan: channel.SecureChannel,
        address: str,
        disks: Future[list[inventory.Disk]] | None = None,
    ) -> bool:
        """Serve one authenticated donor; True when it ended with a successful REPORT."""
        self.emit("connected", {"from": address, "verifier": chan.verifier})
        chan.settimeout(IDLE_TIMEOUT)
        session = _Session(self, chan, address, disks)
        self.session = session
        try:
            return session.run()
        except SessionFailed as e:
            self._fail(e, address)
            chan.send_error(e.reason)
            return False
        except channel.ChannelError as e:
            # The connection broke (or was tampered with: tag failures end up here too).
            # Only verified blobs are kept, so a resume is as safe as a fresh start. A
            # local OSError (disk full, I/O error) is not this: the channel turns its own
            # socket errors into ChannelError, so those fall to the abort below.
            self._fail(SessionFailed(f"connection: {e}", resumable=True), address)
            return False
        except Exception as e:
            # A bug or a tool failure (finalize): never leave a half-install mounted.
            self._fail(SessionFailed(f"internal: {type(e).__name__}: {e}"), address)
            chan.send_error(f"internal error on the target: {type(e).__name__}")
            return False
        finally:
            self.session = None
            chan.close()

    def _fail(self, failure: SessionFailed, address: str) -> None:
        if failure.resumable and self.journal is not None:
            self.set_state("resumable")
            self.emit(
                "failed",
                {
                    "from": address,
                    "reason": failure.reason,
                    "resumable": True,
                    "verified": len(self.journal.verified),
                },
            )
            return
        if self.journal is not None:
            self._abort(failure.reason)
        self.emit("failed", {"from": address, "reason": failure.reason, "resumable": False})
        self.set_state("waiting")

    def _abort(self, reason: str) -> None:
        journal, self.journal = self.journal, None
        if journal is not None:
            try:
                journal.installer.abort(reason)
            except Exception as e:
                self.emit("error", {"reason": f"abort failed: {type(e).__name__}: {e}"})

    def installer_event(self, event: str, doc: dict[str, Any]) -> None:
        """The Installer's events: on screen, and phases to whichever donor is connected
        now (the Installer outlives the connection that created it when a donor resumes)."""
        self.emit(event, doc)
        phase = doc.get("phase")
        session = self.session
        if session is not None and event == "phase" and isinstance(phase, str):
            session.send(messages.PHASE, {"phase": phase})

    def reboot(self) -> None:
        self.emit("reboot", {"argv": list(self.options.reboot_cmd)})
        try:
            runner.run_checked(list(self.options.reboot_cmd), _RebootFailed, timeout=60)
        except _RebootFailed as e:
            # The deploy already succeeded: say the reboot failed, do not turn it into a
            # failed deploy (the caller would report "failed" and go back to waiting).
            self.emit("error", {"reason": f"reboot failed: {e}"})


class _Session:
    """The authenticated part of one connection."""

    def __init__(
        self,
        receiver: Receiver,
        chan: channel.SecureChannel,
        address: str,
        disks: Future[list[inventory.Disk]] | None = None,
    ) -> None:
        self.r = receiver
        self.chan = chan
        self.address = address
        self.disks = disks  # the HELLO's inventory, started during the handshake
        self.machine = messages.StateMachine("target")
        self.written = 0
        self.verified_bytes = 0
        self.current = ""
        self.started = time.monotonic()
        self.last_progress = 0.0

    def send(self, mtype: int, doc: dict[str, Any]) -> None:
        self.machine.check("send", mtype)
        self.chan.send_json(mtype, doc)

    def recv(self) -> tuple[int, bytes]:
        mtype, view = self.recv_view()
        return mtype, bytes(view)

    def recv_view(self) -> tuple[int, memoryview]:
        """The next record, checked against the state machine; the payload is a view into
        the channel's receive ring (valid for channel.RECV_RING - 1 more records)."""
        mtype, payload = self.chan.recv_view()
        try:
            self.machine.check("recv", mtype)
        except channel.ChannelError as e:
            raise SessionFailed(str(e)) from e
        if mtype == messages.ERROR:
            reason = _json(bytes(payload)).get("reason") if payload else None
            # The donor gave up on its side: what is verified so far stays usable.
            raise SessionFailed(f"the donor stopped: {reason}", resumable=True)
        return mtype, payload

    def recv_doc(self) -> tuple[int, dict[str, Any]]:
        mtype, payload = self.recv()
        try:
            doc = strict_json.loads(payload) if payload else {}
        except ValueError as e:
            raise SessionFailed(f"message {mtype} is not JSON") from e
        if not isinstance(doc, dict):
            raise SessionFailed(f"message {mtype} is not a JSON object")
        return mtype, doc

    def hello(self) -> None:
        if self.disks is not None:
            disks = self.disks.result(timeout=IDLE_TIMEOUT)
        else:
            disks = inventory.inventory(allow_loop=self.r.options.allow_loop)
        journal = self.r.journal
        self.send(
            messages.HELLO,
            {
                "disks": [d.to_doc() for d in disks],
                "boot_mode": _boot_mode(),
                "ram": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                "cpus": os.cpu_count(),
                "resume_state": journal.state() if journal is not None else None,
            },
        )

    def run(self) -> bool:
        self.hello()
        mtype, plan = self.recv_doc()
        if mtype != messages.PLAN:
            raise SessionFailed(f"expected PLAN, got message {mtype}")
        journal = self.accept_plan(plan)
        if journal is None:
            return False
        self.receive_files(journal)
        self.r.set_state("busy")
        self.phase("finalizing")
        # Durable when finalize returns; the unmount follows the REPORT (finalize's
        # docstring): the donor does not wait for it.
        report = journal.installer.finalize(unmount=False)
        ok = bool(report.get("ok", True))
        self.r.journal = None  # finalize either finished the disk or reported why not
        try:
            self.send(messages.REPORT, {**report, "ok": ok})
        finally:
            journal.installer.unmount()
        self.r.emit("report", {"from": self.address, "ok": ok, "report": report})
        self.r.set_state("done" if ok else "failed")
        if not ok:
            self.r.set_state("waiting")
            return False
        self.r.deploys += 1
        try:
            mtype, _ = self.recv()
        except (channel.ChannelError, OSError):
            return True  # the donor did not ask for a reboot
        if mtype == messages.REBOOT:
            self.r.reboot()
        return True

    def phase(self, name: str) -> None:
        self.r.emit("phase", {"phase": name})
        self.send(messages.PHASE, {"phase": name})

    def accept_plan(self, plan: dict[str, Any]) -> Journal | None:
        digest = plan_digest(plan)
        journal = self.r.journal
        if journal is not None and journal.plan_digest == digest:
            # The same PLAN bytes were validated before and the disk is already prepared.
            self.send(messages.PLAN_OK, {"resume": True, "verified": sorted(journal.verified)})
            self.r.emit("resume", {"from": self.address, "verified": len(journal.verified)})
            self.r.set_state("busy")
            return journal
        checked = dict(plan)
        disk = plan.get("disk")
        serial = disk.get("serial") if isinstance(disk, dict) else None
        # Unattended: the local policy stands in for the operator typing the serial.
        # (isinstance first: a list or dict here is unhashable, and validate_plan refuses it.)
        if (
            isinstance(serial, str)
            and serial in self.r.options.disk_policy
            and not plan.get("confirm_wipe_serial")
        ):
            checked["confirm_wipe_serial"] = serial
        try:
            disks = inventory.inventory(
                allow_loop=self.r.options.allow_loop,
                only_serial=serial if isinstance(serial, str) else None,
            )
            resolved = install.validate_plan(checked, disks, self.r.options.trust_root)
        except install.PlanRefused as e:
            # The reason and the detail travel apart; whoever shows them joins them once.
            self.send(messages.PLAN_REFUSED, {"reason": e.reason, "message": e.detail})
            self.r.emit(
                "plan_refused", {"from": self.address, "reason": e.reason, "message": e.detail}
            )
            return None
        if journal is not None:
            # A different plan replaces the half-done one: that install is abandoned.
            self.r._abort("a different plan arrived")
        blobs = _plan_blobs(resolved)
        installer = install.Installer(resolved, self.r.options.mountpoint, self.r.installer_event)
        self.send(messages.PLAN_OK, {"resume": False, "verified": []})
        self.r.set_state("busy")
        self.r.emit("plan_ok", {"from": self.address, "disk": serial, "blobs": len(blobs)})
        try:
            installer.prepare()
        except Exception as e:
            try:
                installer.abort(f"prepare failed: {e}")
            finally:
                raise SessionFailed(f"preparing the disk failed: {e}") from e
        journal = Journal(
            plan_digest=digest,
            manifest_sha256=_manifest_sha(resolved),
            disk_serial=str(serial),
            blobs=blobs,
            installer=installer,
        )
        self.r.journal = journal
        return journal

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress < PROGRESS_EVERY:
            return
        self.last_progress = now
        elapsed = max(now - self.started, 1e-6)
        doc = {
            # Durable bytes (fsynced on the target), not bytes received: what survives.
            "written": self.durable(),
            "received": self.written,
            "verified": self.verified_bytes,
            "file": self.current,
            "rate": int(self.written / elapsed),
        }
        self.send(messages.PROGRESS, doc)
        self.r.emit("progress", doc)

    def durable(self) -> int:
        journal = self.r.journal
        if journal is None:
            return 0
        return int(getattr(journal.installer, "durable_bytes", 0))

    def receive_files(self, journal: Journal) -> None:
        self.phase("receiving")
        retried: set[str] = set()
        while True:
            mtype, payload = self.recv()
            if mtype == messages.END:
                break
            if mtype != messages.FILE_BEGIN:
                raise SessionFailed(f"expected FILE_BEGIN or END, got message {mtype}")
            doc = _json(payload)
            blob_id, size = doc.get("blob_id"), doc.get("size")
            if not isinstance(blob_id, str) or journal.blobs.get(blob_id) != size:
                raise SessionFailed(f"FILE_BEGIN for a blob the manifest does not list: {blob_id}")
            if blob_id in journal.verified:
                raise SessionFailed(f"blob {blob_id} was already verified")
            if not isinstance(size, int):
                raise SessionFailed("FILE_BEGIN without a size")
            if self.receive_one(journal, blob_id, size):
                continue
            if blob_id in retried:
                raise SessionFailed(f"blob {blob_id} failed verification twice")
            retried.add(blob_id)
        missing = [b for b in journal.blobs if b not in journal.verified]
        if missing:
            raise SessionFailed(f"END before every blob arrived: {len(missing)} missing")
        self.phase("verifying")
        self.progress(force=True)

    def receive_one(self, journal: Journal, blob_id: str, size: int) -> bool:
        self.current = blob_id
        sink = journal.installer.receive(blob_id, size)
        try:
            return self._receive_into(journal, sink, blob_id, size)
        except BaseException:
            # A partial blob restarts from zero on resume; release what the sink holds.
            _close_sink(sink)
            raise

    def _receive_into(
        self, journal: Journal, sink: install.BlobSink, blob_id: str, size: int
    ) -> bool:
        got = 0
        failure: str | None = None
        clock = _SessionClock(self.chan)
        while True:
            clock.mark()
            mtype, payload = self.recv_view()  # DATA goes to the sink without a copy
            clock.received()
            if mtype == messages.FILE_END:
                break
            if mtype != messages.DATA:
                raise SessionFailed(f"expected DATA or FILE_END, got message {mtype}")
            got += len(payload)
            if got > size:
                raise SessionFailed(f"blob {blob_id}: more bytes than the manifest declares")
            if failure is None:
                try:
                    sink.write(payload)
                except Exception as e:
                    failure = f"write failed: {e}"
            clock.handed()
            self.written += len(payload)
            self.progress()
        clock.stop()
        if failure is None and got != size:
            failure = f"{got} bytes, the manifest declares {size}"
        if failure is None:
            try:
                sink.finish()
            except Exception as e:
                failure = str(e) or type(e).__name__
        if failure is not None:
            _close_sink(sink)
            self.send(messages.FILE_BAD, {"blob_id": blob_id, "reason": failure})
            self.r.emit("file_bad", {"blob_id": blob_id, "reason": failure})
            return False
        journal.verified.add(blob_id)
        self.verified_bytes += size
        self.send(messages.FILE_OK, {"blob_id": blob_id})
        event: dict[str, Any] = {"blob_id": blob_id, "size": size}
        figures = getattr(sink, "figures", None)
        if figures is not None:
            # The image: where its stream waited, thread by thread (bench.deploy prints it).
            event["threads"] = {**figures(), "session": clock.figures()}
        self.r.emit("file_ok", event)
        self.progress(force=True)
        return True


class _SessionClock(image_writer.Clock):
    """The session thread's time while one blob streams, on the writer threads' clock:
    its `wait` is `recv_s`, in recv_view (waiting for the socket and copying out of it,
    `decrypt_s` of it in the AEAD), its `busy` is `sink_s`, in the sink's write (for the
    image: the store copy and the hand-off to the decoder, which the image sink splits
    further), with the thread's CPU and run-queue seconds."""

    def __init__(self, chan: channel.SecureChannel) -> None:
        super().__init__()
        self.chan = chan
        self.records = 0
        self._decrypt0 = chan.decrypt_s
        self._t0 = time.perf_counter()
        self.wall_s = 0.0
        self.start()

    def mark(self) -> None:
        """Neither receiving nor handing on from here (progress reports)."""
        self._t = time.perf_counter()

    def received(self) -> None:
        self.waited()

    def handed(self) -> None:
        self.worked()
        self.records += 1

    def stop(self) -> None:
        super().stop()
        self.wall_s = time.perf_counter() - self._t0

    def figures(self) -> dict[str, float]:
        return {
            "wall_s": self.wall_s,
            "recv_s": self.wait,
            "decrypt_s": self.chan.decrypt_s - self._decrypt0,
            "sink_s": self.busy,
            "cpu_s": self.cpu,
            "runqueue_s": self.runqueue,
            "records": self.records,
        }


def _reset(conn: socket.socket) -> None:
    """Close with RST at once (SO_LINGER 0): nothing to read, nothing to wait for."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


def _send_busy_record(chan: channel.SecureChannel) -> None:
    try:
        chan.send_json(messages.BUSY, {"reason": "another donor is being served"})
    except (channel.ChannelError, OSError):
        pass
    chan.close()


def _close_sink(sink: install.BlobSink) -> None:
    try:
        sink.close()
    except Exception:  # noqa: S110 (best effort; the failure being handled matters more)
        pass


def _boot_mode() -> str:
    return "uefi" if Path("/sys/firmware/efi").exists() else "bios"


def _first_mac() -> str:
    """The first non-loopback MAC: an operator hint to tell machines apart."""
    try:
        names = sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name != "lo")
        for name in names:
            mac = (Path("/sys/class/net") / name / "address").read_text().strip()
            if mac and mac != "00:00:00:00:00:00":
                return mac
    except OSError:
        pass
    return ""


def _json(payload: bytes) -> dict[str, Any]:
    try:
        doc = strict_json.loads(payload)
    except ValueError as e:
        raise SessionFailed("a message payload is not JSON") from e
    if not isinstance(doc, dict):
        raise SessionFailed("a message payload is not a JSON object")
    return doc


def _plan_blobs(resolved: install.ResolvedPlan) -> dict[str, int]:
    return dict(resolved.manifest.blobs)


def _manifest_sha(resolved: install.ResolvedPlan) -> str:
    return str(resolved.manifest_sha256)
