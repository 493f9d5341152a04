"""cloud-hypervisor VMs: launch, track, persist, re-adopt, and stop with escalation.

One VMM process per VM, started in its own session so it outlives the daemon. Each VM has
a directory under $STATE_DIR/machines/<id>/ (record.json, serial.log, vmm.log, vmm.stderr,
events.jsonl) and an API socket at $RUN_DIR/<id>.sock. Liveness is the PID (checked with
its start time, so a reused PID is not mistaken for the VM); state comes from `vm.info`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from smechvisord import atomic, logcap, procs, strict_json
from smechvisord import protocol as p
from smechvisord.chapi import ChApi, ChApiError, ChUnreachableError
from smechvisord.errors import ApiError
from smechvisord.host import Host
from smechvisord.settings import Settings
from smechvisord.validate import VmSpec

log = logging.getLogger(__name__)

RECORD = "record.json"
SERIAL_LOG = "serial.log"
VMM_LOG = "vmm.log"
VMM_STDERR = "vmm.stderr"
EVENTS = "events.jsonl"
# What the VMM writes without end while a VM runs (the daemon's _cap_logs bounds each).
CAPPED_LOGS = (SERIAL_LOG, VMM_LOG, EVENTS)
LOG_TAIL_LINES = 20
USAGE_TTL = 1.0
EVENTS_TAIL_BYTES = 16384
# AF_UNIX paths are limited to 108 bytes including the NUL.
MAX_SOCKET_PATH = 107
KVM_FAILURE = "Failed to open hypervisor interface"
MAX_RECORD_BYTES = 1 << 20
# A write that fails for these is the state dir being full, not a daemon fault.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

# The escalation ladder after the graceful request (design/daemon.md): seconds per step.
STEP_WAIT = {"vm.shutdown+vmm.shutdown": 5.0, "SIGTERM": 5.0, "SIGKILL": 5.0}
# A step whose request failed (e.g. power-button to a VM already shut down inside its VMM)
# will not end the process: only watch briefly for an exit already under way.
FAILED_STEP_WAIT = 1.0

VMM_STATES = {
    "Running": p.STATE_RUNNING,
    "Paused": p.STATE_PAUSED,
    "BreakPoint": p.STATE_PAUSED,
    # After vm.shutdown v42 keeps the process and reports Created.
    "Created": p.STATE_STOPPED,
    "Shutdown": p.STATE_STOPPED,
}


@dataclass
class Vm:
    """What the daemon persists about one VM (record.json)."""

    id: str
    uuid: str
    cpus: int
    memory_mb: int
    disk: str
    argv: list[str]
    created_at: float
    state: str = p.STATE_STOPPED
    pid: int | None = None
    pid_start: int | None = None
    started_at: float | None = None
    exit: dict[str, Any] | None = None
    last_shutdown: dict[str, Any] | None = None
    # (st_dev, st_ino) of the disk when the VM was created: a hard link, a bind mount or
    # a renamed path still names the same disk.
    disk_id: list[int] | None = None

    @classmethod
    def from_record(cls, data: Any, dir_name: str) -> Vm:
        """The VM a record.json describes, or RecordError naming what is wrong with it.
        The file is state anyone with write access to the state dir could have edited:
        every field is checked, and the id must be the directory's name."""
        if not isinstance(data, dict):
            raise RecordError(f"not a JSON object but {type(data).__name__}")
        vm_id = data.get("id")
        if not isinstance(vm_id, str) or not p.VM_ID_RE.fullmatch(vm_id):
            raise RecordError(f"id {vm_id!r} is not a VM id")
        if vm_id != dir_name:
            raise RecordError(f"id {vm_id!r} does not match its directory {dir_name!r}")
        known = {f.name for f in fields(cls)}
        for name, kinds in _RECORD_FIELDS.items():
            if name not in data:
                if name in _REQUIRED:
                    raise RecordError(f"{name} is missing")
                continue
            value = data[name]
            if value is None and name not in _REQUIRED:
                continue
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise RecordError(f"{name} is {type(value).__name__}, not {_kind_names(kinds)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise RecordError(f"{name} is not a finite number")
        if data.get("state", p.STATE_STOPPED) not in p.VM_STATES:
            raise RecordError(f"state {data['state']!r} is not one of {', '.join(p.VM_STATES)}")
        if not data["argv"] or not all(isinstance(a, str) for a in data["argv"]):
            raise RecordError("argv is not a list of strings")
        disk_id = data.get("disk_id")
        if disk_id is not None and (len(disk_id) != 2 or not all(type(n) is int for n in disk_id)):
            raise RecordError("disk_id is not [device, inode]")
        for name in ("pid", "pid_start", "cpus", "memory_mb"):
            if isinstance(data.get(name), int) and data[name] < 0:
                raise RecordError(f"{name} is negative")
        return cls(**{k: v for k, v in data.items() if k in known})


class RecordError(ValueError):
    pass


_NUMBER = (int, float)
_RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "uuid": str,
    "cpus": int,
    "memory_mb": int,
    "disk": str,
    "argv": list,
    "created_at": _NUMBER,
    "state": str,
    "pid": int,
    "pid_start": int,
    "started_at": _NUMBER,
    "exit": dict,
    "last_shutdown": dict,
    "disk_id": list,
}
_REQUIRED = {"uuid", "cpus", "memory_mb", "disk", "argv", "created_at"}


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))


def disk_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


class StorageFullError(ApiError):
    """507: the state dir has no room for a record. `vm` is what really happened."""

    def __init__(self, message: str, vm: dict[str, Any] | None = None) -> None:
        details = {"vm": vm, "saved": False} if vm is not None else {}
        super().__init__(507, p.ERR_INSUFFICIENT_STORAGE, message, details)


@dataclass
class _Runtime:
    """What only this daemon instance knows: its children and per-VM action locks."""

    child: subprocess.Popen[bytes] | None = None
    action: threading.Lock = field(default_factory=threading.Lock)
    action_name: str = ""
    expect_exit: bool = False
    events_size: int = -1
    # The VMM said its VM is shut down (Created/Shutdown) while its process lives on.
    retire: bool = False
    # The logs cut to their budget (each said once) / a log that cannot be (warned once).
    logs_capped: set[str] = field(default_factory=set)
    log_cap_failed: bool = False


class VmManager:
    def __init__(self, settings: Settings, host: Host) -> None:
        self.settings = settings
        self.host = host
        self._lock = threading.RLock()
        self._vms: dict[str, Vm] = {}
        self._rt: dict[str, _Runtime] = {}
        self._cpu = procs.CpuSampler()
        self._foreign_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])
        # PIDs whose command line is known not to be a VMM: a scan reads only new ones.
        self._not_vmm: set[int] = set()
        # Foreign VMMs whose command line could not be read, logged once each.
        self._odd_foreign: set[int] = set()
        # Record directories that could not be read: name -> why (listed as broken).
        self._broken: dict[str, str] = {}
        # Names whose directory is being removed: a create of the same name waits its turn.
        self._removing: set[str] = set()
        # VMs whose latest state is not on disk yet (the state dir was full).
        self._unsaved: set[str] = set()
        self._path_cache: dict[str, tuple[str, str]] = {}
        self._usage_cache: dict[int, tuple[float, float | None, float | None]] = {}
        # Bumped on every change to any VM record; see list_all_encoded.
        self.generation = 0
        self._listing: tuple[int, float, bytes] = (-1, 0.0, b"")
        self._render = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    # ---- paths ---------------------------------------------------------------------

    def vm_dir(self, vm_id: str) -> Path:
        return self.settings.records_dir / vm_id

    def socket_path(self, vm_id: str) -> Path:
        return self.settings.run_dir / f"{vm_id}.sock"

    def _paths(self, vm_id: str) -> tuple[str, str]:
        """(API socket, serial log) as strings, built once: listings need them per VM."""
        paths = self._path_cache.get(vm_id)
        if paths is None:
            paths = (str(self.socket_path(vm_id)), str(self.vm_dir(vm_id) / SERIAL_LOG))
            self._path_cache[vm_id] = paths
        return paths

    def check_paths(self) -> None:
        """Refuse to start with a run dir whose socket paths the kernel would reject."""
        longest = self.socket_path("x" * 32)
        if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
            raise RuntimeError(
                f"SMECHVISORD_RUN_DIR {self.settings.run_dir} is too long for VMM API sockets "
                f"(AF_UNIX paths are limited to {MAX_SOCKET_PATH} bytes); choose a shorter path"
            )
        for d in (self.settings.state_dir, self.settings.run_dir):
            if "," in str(d):
                raise RuntimeError(f"{d}: the VMM's option syntax cannot take ',' in a path")

    # ---- start-up: re-adoption -----------------------------------------------------

    def load(self) -> None:
        """Read every record and re-adopt the VMs whose VMM still runs."""
        records = self.settings.records_dir
        records.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.settings.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for vm_dir in sorted(records.iterdir()):
            try:
                vm = self._read_record(vm_dir)
            except (OSError, ValueError) as e:
                # One bad record must not keep the daemon (and every other VM) down: it is
                # left as it is, listed as broken, and never started or removed.
                log.warning("skipping unreadable VM record in %s: %s", _printable(vm_dir), e)
                self._broken[vm_dir.name] = str(e)
                continue
            with self._lock:
                self._vms[vm.id] = vm
                self._rt[vm.id] = _Runtime()
            if vm.state in p.LIVE_STATES:
                self._readopt(vm)
        log.info("loaded %d VM records", len(self._vms))

    def _read_record(self, vm_dir: Path) -> Vm:
        if vm_dir.is_symlink() or not vm_dir.is_dir():
            raise RecordError("not a directory")
        for stale in vm_dir.glob(f".{RECORD}.*.tmp"):
            stale.unlink(missing_ok=True)  # a write cut short by a crash
        with (vm_dir / RECORD).open("rb") as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            raise RecordError(f"larger than {MAX_RECORD_BYTES} bytes")
        return Vm.from_record(strict_json.loads(raw), vm_dir.name)

    def _readopt(self, vm: Vm) -> None:
        sock = str(self.socket_path(vm.id))
        if vm.pid is None:
            # The daemon died between writing the record and recording the PID.
            vm.pid = self._find_vmm_by_socket(sock)
            st = procs.stat(vm.pid) if vm.pid else None
            vm.pid_start = st.start_ticks if st else None
        if vm.pid and self._is_our_vmm(vm.pid, vm.pid_start, sock):
            log.info("re-adopted VM %s (pid %d)", vm.id, vm.pid)
            self._refresh_state(vm)
            self._persist(vm)
            return
        self._mark_exited(
            vm, code=None, sig=None, reason="the VMM exited while smechvisord was not running"
        )

    def _find_vmm_by_socket(self, sock: str) -> int | None:
        wanted = f"path={sock}"
        for pid in procs.pids():
            argv = procs.cmdline(pid)
            if argv and wanted in argv:
                return pid
        return None

    @staticmethod
    def _is_our_vmm(pid: int, start: int | None, sock: str) -> bool:
        if not procs.is_alive(pid, start):
            return False
        argv = procs.cmdline(pid) or []
        return f"path={sock}" in argv

    # ---- monitor ----------------------------------------------------------------------

    def start_monitor(self, interval: float = 0.5) -> None:
        self._monitor = threading.Thread(
            target=self._monitor_loop, args=(interval,), name="vm-monitor", daemon=True
        )
        self._monitor.start()

    def stop_monitor(self) -> None:
        self._stop.set()
        if self._monitor:
            self._monitor.join(timeout=5)

    def _monitor_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.poll_once()
            except Exception:  # the monitor must outlive any one bad VM
                log.exception("VM monitor pass failed")

    def poll_once(self) -> None:
        """Notice VMMs that exited, and re-read vm.info for VMs whose event log grew.

        The event monitor file is how cloud-hypervisor tells of pauses, resumes, reboots
        and shutdowns made by anyone (ch-remote included). Watching its size costs one
        stat per VM; polling vm.info for 50 VMs every few seconds cost request latency.
        """
        if self._unsaved:
            self._save_unsaved()
        with self._lock:
            live = [(vm, self._rt.get(vm.id)) for vm in self._vms.values()]
        for vm, rt in live:
            if rt is None or vm.state not in p.LIVE_STATES:
                continue
            self._cap_logs(vm, rt)
            # Hold the action lock, not just peek at it: an action starting between a peek
            # and _mark_exited would race this pass (both reaping rt.child, both writing
            # the record, a start's new child cleared by this pass's old verdict).
            if not rt.action.acquire(blocking=False):
                continue  # the action in progress owns this VM's state
            try:
                rt.action_name = "monitor"
                self._poll_vm(vm, rt)
            finally:
                rt.action_name = ""
                rt.action.release()

    def _cap_logs(self, vm: Vm, rt: _Runtime) -> None:
        """Keep each log the VMM writes within its disk budget: a guest printing without
        end (or rebooting without end) would otherwise fill the state dir, and with it
        every VM record. Half the budget is kept, so a steady stream costs one cut per
        half budget, not one per pass."""
        budget = self.settings.vm_log_max_mb << 20
        for name in CAPPED_LOGS:
            path = str(self.vm_dir(vm.id) / name)
            try:
                if logcap.disk_usage(path)[1] <= budget:
                    continue
                dropped = logcap.drop_head(path, budget // 2)
            except FileNotFoundError:
                continue
            except OSError as e:
                if not rt.log_cap_failed:
                    rt.log_cap_failed = True
                    log.warning("VM %s: cannot keep %s to its budget: %s", vm.id, name, e)
                continue
            if dropped and name not in rt.logs_capped:
                rt.logs_capped.add(name)
                log.info(
                    "VM %s: %s past %d MiB; its oldest part is dropped from now on",
                    vm.id,
                    name,
                    self.settings.vm_log_max_mb,
                )

    def _poll_vm(self, vm: Vm, rt: _Runtime) -> None:
        if vm.state not in p.LIVE_STATES:
            return  # an action finished between the snapshot and the lock
        exited = self._exit_status(vm, rt)
        if exited is not None:
            code, sig = exited
            self._mark_exited(vm, code, sig)
            return
        try:
            size = os.stat(self.vm_dir(vm.id) / EVENTS).st_size
        except OSError:
            size = -1
        if size != rt.events_size:
            rt.events_size = size
            self._refresh_state(vm)
        if rt.retire:
            # The guest was shut down through the VMM's API (ch-remote shutdown): v42
            # keeps the process, but here a stopped VM has no VMM (a start spawns a new
            # one on the same socket and disk). End it the way `stop` does.
            log.info("VM %s was shut down through its VMM; ending the VMM", vm.id)
            try:
                self._escalate(
                    vm,
                    rt,
                    graceful_wait=None,
                    reason="the VM was shut down through the VMM API; smechvisord ended the VMM",
                )
            except ApiError as e:
                log.warning("could not end the VMM of %s: %s", vm.id, e.message)

    def _exit_status(self, vm: Vm, rt: _Runtime) -> tuple[int | None, int | None] | None:
        """None while the VMM runs; else (exit code, signal), either unknown (None) for a
        VMM this daemon instance did not start (only its parent can collect the status)."""
        child = rt.child  # read once: a concurrent _mark_exited may clear it
        if child is not None:
            code = child.poll()
            if code is None:
                return None
            return (code, None) if code >= 0 else (None, -code)
        if vm.pid and procs.is_alive(vm.pid, vm.pid_start):
            return None
        return (None, None)

    def _mark_exited(
        self, vm: Vm, code: int | None, sig: int | None, reason: str | None = None
    ) -> None:
        rt = self._rt[vm.id]
        clean = code == 0 or (code is None and sig is None and self._vmm_said_shutdown(vm))
        state = p.STATE_STOPPED if rt.expect_exit or clean else p.STATE_FAILED
        if reason is None:
            if sig is not None:
                reason = f"the VMM was killed by signal {sig}"
            elif code is not None:
                reason = f"the VMM exited with code {code}"
            else:
                reason = "the VMM exited"
        with self._lock:
            vm.state = state
            vm.exit = {
                "code": code,
                "signal": sig,
                "at": time.time(),
                "reason": reason,
                "log_tail": self.log_tail(vm.id),
            }
            if vm.pid is not None:
                self._usage_cache.pop(vm.pid, None)
            vm.pid = None
            vm.pid_start = None
            rt.child = None
            rt.retire = False
        self.socket_path(vm.id).unlink(missing_ok=True)
        self._persist(vm)
        log.info("VM %s is %s: %s", vm.id, state, reason)

    def _vmm_said_shutdown(self, vm: Vm) -> bool:
        """For a VMM we could not wait for: was its last VMM event a clean shutdown?"""
        try:
            with (self.vm_dir(vm.id) / EVENTS).open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - EVENTS_TAIL_BYTES))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return False
        last = None
        for event in parse_events(text):
            if event.get("source") == "vmm":
                last = event.get("event")
        return last == "shutdown"

    def _refresh_state(self, vm: Vm) -> None:
        api = ChApi(str(self.socket_path(vm.id)), timeout=2.0)
        try:
            info = api.info()
        except (ChApiError, ChUnreachableError) as e:
            log.debug("vm.info for %s failed: %s", vm.id, e)
            return
        state = VMM_STATES.get(str(info.get("state")))
        rt = self._rt.get(vm.id)
        if state == p.STATE_STOPPED and rt is not None:
            # The VM is over but v42 keeps its process: leave the state live (so start,
            # delete and the disk check still see a VMM) until the monitor ends it.
            rt.retire = True
            return
        if state is not None and state != vm.state:
            with self._lock:
                vm.state = state
            self._persist(vm)

    # ---- persistence ------------------------------------------------------------------

    def _persist(self, vm: Vm) -> None:
        """Write the record. A full state dir does not raise: the VM stays as it really
        is in memory, is marked unsaved (the caller answers 507), and the monitor writes
        the record once there is room again."""
        # Every change of a VM is persisted, so this is where listings learn they are stale.
        self.generation += 1
        with self._lock:
            data = asdict(vm)
        vm_dir = self.vm_dir(vm.id)
        if not vm_dir.is_dir():
            return
        try:
            atomic.write_json(vm_dir / RECORD, data)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            if vm.id not in self._unsaved:
                log.warning("cannot save the record of VM %s: %s; will retry", vm.id, e)
            self._unsaved.add(vm.id)
            return
        if vm.id in self._unsaved:
            self._unsaved.discard(vm.id)
            log.info("the record of VM %s is saved again", vm.id)

    def _save_unsaved(self) -> None:
        for vm_id in sorted(self._unsaved):
            with self._lock:
                vm = self._vms.get(vm_id)
            if vm is None:
                self._unsaved.discard(vm_id)
                continue
            self._persist(vm)

    def _check_saved(self, vm: Vm, what: str) -> None:
        """After an action: 507 when its outcome could not be recorded. The answer says
        what really happened; the record catches up when space returns."""
        if vm.id in self._unsaved:
            raise StorageFullError(
                f"{what}, but its record could not be saved: no space left in "
                f"{self.settings.state_dir}. The daemon reports the VM as it really is and "
                "saves the record once space is freed",
                self._public(vm),
            )

    # ---- reading ----------------------------------------------------------------------

    def log_tail(self, vm_id: str, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The VMM's last words: its stderr, then its log file."""
        out: list[str] = []
        for name in (VMM_STDERR, VMM_LOG):
            out += tail_lines(self.vm_dir(vm_id) / name, lines)
        return out[-lines:]

    def _public(self, vm: Vm) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": vm.id,
            "name": vm.id,
            "uuid": vm.uuid,
            "managed": True,
            "state": vm.state,
            "pid": vm.pid,
            "cpus": vm.cpus,
            "memory_mb": vm.memory_mb,
            "disk": vm.disk,
            "cpu_percent": None,
            "rss_mb": None,
            "created_at": vm.created_at,
            "started_at": vm.started_at,
            "exit": vm.exit,
            "last_shutdown": vm.last_shutdown,
        }
        doc["api_socket"], doc["serial_log"] = self._paths(vm.id)
        if vm.pid:
            doc["cpu_percent"], doc["rss_mb"] = self._usage(vm.pid)
        return doc

    def _usage(self, pid: int) -> tuple[float | None, float | None]:
        """CPU percent and RSS of a VMM, sampled at most once a second (like top): a
        listing of 50 VMs would otherwise read 50 /proc files on every request."""
        now = time.monotonic()
        cached = self._usage_cache.get(pid)
        if cached is not None and now - cached[0] < USAGE_TTL:
            return cached[1], cached[2]
        st = procs.stat(pid)
        usage = (
            (None, None) if st is None else (self._cpu.percent(st), round(st.rss_bytes / 2**20, 1))
        )
        self._usage_cache[pid] = (now, *usage)
        return usage

    def list_all(self) -> list[dict[str, Any]]:
        with self._lock:
            vms = sorted(self._vms.values(), key=lambda v: v.created_at)
            broken = sorted(self._broken.items())
        return (
            [self._public(vm) for vm in vms]
            + [self._broken_doc(name, why) for name, why in broken]
            + self._foreign()
        )

    def _broken_doc(self, name: str, why: str) -> dict[str, Any]:
        return {
            "id": name,
            "name": name,
            "managed": True,
            "state": p.STATE_BROKEN,
            "broken": f"{self.vm_dir(name) / RECORD}: {why}; fix or remove the file by hand "
            "and restart smechvisord",
            "pid": None,
            "cpus": None,
            "memory_mb": None,
            "disk": None,
            "cpu_percent": None,
            "rss_mb": None,
        }

    def list_all_encoded(self) -> bytes:
        """list_all() as JSON, reused for up to USAGE_TTL seconds while no VM changed.
        The figures in it are sampled once a second anyway; encoding 50 records was most
        of what GET /api/vms cost."""
        generation, at, data = self._listing
        if generation == self.generation:
            if time.monotonic() - at < USAGE_TTL:
                return data
            # Only the usage figures aged: one thread re-renders, the others keep serving
            # the previous rendering meanwhile instead of all re-rendering at once.
            if not self._render.acquire(blocking=False):
                return data
        else:
            # A VM changed: everyone waits for a rendering that includes the change.
            self._render.acquire()
        try:
            generation, at, data = self._listing
            if generation == self.generation and time.monotonic() - at < USAGE_TTL:
                return data  # rendered by the thread we waited for
            generation = self.generation
            data = json.dumps(self.list_all()).encode()
            self._listing = (generation, time.monotonic(), data)
            return data
        finally:
            self._render.release()

    def running_count(self) -> int:
        with self._lock:
            return sum(1 for vm in self._vms.values() if vm.state in p.LIVE_STATES)

    def get(self, vm_id: str) -> dict[str, Any]:
        # `vm list` shows a VMM this daemon did not start as pid-N: show finds it too.
        with self._lock:
            ours = vm_id in self._vms
        unmanaged = None if ours else self._unmanaged(vm_id)
        if unmanaged is not None:
            return unmanaged
        vm = self._find(vm_id)
        rt = self._rt[vm.id]
        if vm.state in p.LIVE_STATES and not rt.action.locked():
            self._refresh_state(vm)
        return self._public(vm)

    def _find(self, vm_id: str) -> Vm:
        # Ids come from URLs: anything but a VM id (`..`, '/', NUL) is no VM, before any
        # lookup or path is built from it.
        vm = None
        if p.VM_ID_RE.fullmatch(vm_id):
            with self._lock:
                vm = self._vms.get(vm_id)
            if vm is None and vm_id in self._broken:
                raise ApiError(
                    409,
                    p.ERR_CONFLICT,
                    f"the record of VM {vm_id!r} cannot be read "
                    f"({self.vm_dir(vm_id) / RECORD}: {self._broken[vm_id]}): repair it, or "
                    f"move {self.vm_dir(vm_id)} out of the state dir, then restart "
                    "smechvisord (rc-service smechvisord restart)",
                    {"id": vm_id, "state": p.STATE_BROKEN},
                )
        if vm is None:
            unmanaged = self._unmanaged(vm_id)
            if unmanaged is not None:
                raise ApiError(
                    409,
                    p.ERR_CONFLICT,
                    f"VM {vm_id} is a VMM smechvisord did not start (pid {unmanaged['pid']}): "
                    "it is listed and shown, not driven; stop it where it was started",
                    {"id": vm_id, "managed": False, "pid": unmanaged["pid"]},
                )
            raise ApiError(404, p.ERR_NOT_FOUND, f"no VM named {vm_id!r}", {"id": vm_id})
        return vm

    def _unmanaged(self, vm_id: str) -> dict[str, Any] | None:
        """The listed document of the VMM this daemon did not start that `vm_id` names."""
        if not p.UNMANAGED_ID_RE.fullmatch(vm_id):
            return None
        return next((doc for doc in self._foreign() if doc.get("id") == vm_id), None)

    def _foreign(self) -> list[dict[str, Any]]:
        """VMM processes this daemon did not start (by hand, or by another tool)."""
        now = time.monotonic()
        cached_at, cached = self._foreign_cache
        if now - cached_at < 2.0:
            return cached
        with self._lock:
            ours = {vm.pid for vm in self._vms.values() if vm.pid}
        names = {"cloud-hypervisor", Path(self.settings.ch_bin).name}
        found: list[dict[str, Any]] = []
        current = set(procs.pids())
        self._not_vmm &= current  # forget exited PIDs, so a reused PID is looked at again
        self._odd_foreign &= current
        # The same scan bounds the per-PID sample caches to processes that still exist.
        self._cpu.retain(current)
        for gone in [pid for pid in self._usage_cache if pid not in current]:
            self._usage_cache.pop(gone, None)
        for pid in sorted(current - self._not_vmm):
            if pid in ours or pid == os.getpid():
                continue
            argv = procs.cmdline(pid)
            # An interpreter-run stand-in shows the script as argv[1].
            if not argv or not any(os.path.basename(a) in names for a in argv[:2]):
                if argv:  # kernel threads have none; new processes may not have one yet
                    self._not_vmm.add(pid)
                continue
            st = procs.stat(pid)
            if st is None or st.state in ("Z", "X"):
                continue
            try:
                doc = foreign_doc(pid, argv, st, self._cpu.percent(st))
            except Exception as e:  # any local user can run a `cloud-hypervisor`
                if pid not in self._odd_foreign:
                    self._odd_foreign.add(pid)
                    log.warning("cannot read the command line of VMM pid %d: %r", pid, e)
                doc = {"id": unmanaged_id(pid), "name": None, "managed": False, "pid": pid}
                doc["state"] = "unknown"
            found.append(doc)
        self._foreign_cache = (now, found)
        return found

    def console(self, vm_id: str, offset: int | None, max_bytes: int) -> dict[str, Any]:
        vm = self._find(vm_id)
        # Read before the log: a VM seen stopped here wrote all it will before the read
        # below, so a follower that reads to `size` and sees it stopped has everything.
        state = vm.state
        path = self.vm_dir(vm.id) / SERIAL_LOG
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                start = max(0, size - max_bytes) if offset is None else min(offset, size)
                # Never the dropped head of a long log (_cap_logs): it reads as NULs.
                start = logcap.first_data(f.fileno(), start, size)
                f.seek(start)
                data = f.read(max_bytes)
        except FileNotFoundError:
            size, start, data = 0, 0, b""
        return {
            "id": vm.id,
            "offset": start,
            "next_offset": start + len(data),
            "size": size,
            "data": data.decode("utf-8", "replace"),
            # What the monitor last saw (no VMM call per poll): a follower stops once the
            # VM is no longer live and it has read to `size`.
            "state": state,
        }

    # ---- create and start ----------------------------------------------------------

    def preflight(self) -> str:
        """The VMM binary's path, or a 503 that says what is missing and what to do."""
        ch = self.settings.ch_bin
        path = shutil.which(ch)
        if path is None:
            raise ApiError(
                503,
                p.ERR_VMM_UNAVAILABLE,
                f"cloud-hypervisor not found ({ch!r}): install cloud-hypervisor v42 or set "
                "SMECHVISORD_CH_BIN to its path",
                {"ch_bin": ch},
            )
        kvm = self.settings.host_path("/dev/kvm")
        if not self.host.kvm_available():
            raise ApiError(
                503,
                p.ERR_KVM_UNAVAILABLE,
                f"{kvm} does not exist: enable VT-x/AMD-V in firmware setup and load "
                "kvm_intel or kvm_amd",
                {"path": str(kvm)},
            )
        if not os.access(kvm, os.R_OK | os.W_OK):
            raise ApiError(
                503,
                p.ERR_KVM_UNAVAILABLE,
                f"{kvm} is not usable by the daemon's user: run smechvisord as root or add "
                "it to the kvm group",
                {"path": str(kvm)},
            )
        if not self.settings.firmware.is_file():
            raise ApiError(
                503,
                p.ERR_FIRMWARE_MISSING,
                f"firmware {self.settings.firmware} not found: install CLOUDHV.fd or set "
                "SMECHVISORD_FIRMWARE",
                {"firmware": str(self.settings.firmware)},
            )
        return path

    def build_argv(self, ch_path: str, vm_id: str, vm_uuid: str, spec: VmSpec) -> list[str]:
        d = self.vm_dir(vm_id)
        return [
            ch_path,
            "--api-socket",
            f"path={self.socket_path(vm_id)}",
            "--event-monitor",
            f"path={d / EVENTS}",
            "--log-file",
            str(d / VMM_LOG),
            "-v",
            # v42 takes key=value lists: `--cpus 4` is invalid, sizes need uppercase units.
            "--cpus",
            f"boot={spec.cpus}",
            "--memory",
            f"size={spec.memory_mb}M",
            "--firmware",
            str(self.settings.firmware),
            "--disk",
            f"path={spec.disk}",
            "--serial",
            f"file={d / SERIAL_LOG}",
            # The default console is `tty`: guest output on the VMM's stdout.
            "--console",
            "off",
            "--platform",
            f"uuid={vm_uuid}",
        ]

    def create(self, spec: VmSpec) -> tuple[int, dict[str, Any]]:
        vm_id = spec.name or self._new_id()
        vm_uuid = str(uuid.uuid4())
        if spec.dry_run:
            problems: list[str] = []
            try:
                ch_path = self.preflight()
            except ApiError as e:
                problems.append(e.message)
                ch_path = self.settings.ch_bin
            argv = self.build_argv(ch_path, vm_id, vm_uuid, spec)
            foreign = self._foreign_disks()
            with self._lock:
                if vm_id in self._vms:
                    problems.append(f"a VM named {vm_id!r} already exists")
                try:
                    self._check_disk_free(str(spec.disk), foreign)
                except ApiError as e:
                    problems.append(e.message)
            return 200, {"dry_run": True, "id": vm_id, "argv": argv, "problems": problems}
        ch_path = self.preflight()
        foreign = self._foreign_disks()  # before the lock: the /proc scan takes it too
        with self._lock:
            if vm_id in self._vms or vm_id in self._broken:
                raise ApiError(
                    409,
                    p.ERR_CONFLICT,
                    f"a VM named {vm_id!r} already exists",
                    {"field": "name", "id": vm_id},
                )
            if vm_id in self._removing:
                raise ApiError(
                    409,
                    p.ERR_CONFLICT,
                    f"VM {vm_id!r} is being deleted; retry when the delete has finished",
                    {"field": "name", "id": vm_id},
                )
            self._check_disk_free(str(spec.disk), foreign)
            vm = Vm(
                id=vm_id,
                uuid=vm_uuid,
                cpus=spec.cpus,
                memory_mb=spec.memory_mb,
                disk=str(spec.disk),
                argv=self.build_argv(ch_path, vm_id, vm_uuid, spec),
                created_at=time.time(),
                state=p.STATE_STARTING,
                disk_id=list(disk_identity(str(spec.disk)) or ()) or None,
            )
            self._vms[vm_id] = vm
            self._rt[vm_id] = _Runtime()
        rt = self._rt[vm_id]
        with rt.action:
            try:
                self.vm_dir(vm_id).mkdir(mode=0o700)
            except FileExistsError:
                # A directory nobody loaded (a leftover, or made by hand): not ours to use
                # or to remove.
                with self._lock:
                    self._vms.pop(vm_id, None)
                    self._rt.pop(vm_id, None)
                raise ApiError(
                    409,
                    p.ERR_CONFLICT,
                    f"{self.vm_dir(vm_id)} already exists; remove it or choose another name",
                    {"field": "name", "id": vm_id},
                ) from None
            except OSError as e:
                with self._lock:
                    self._vms.pop(vm_id, None)
                    self._rt.pop(vm_id, None)
                if e.errno in NO_SPACE:
                    raise StorageFullError(
                        f"no space left in {self.settings.state_dir} for VM {vm_id}; "
                        "nothing was started"
                    ) from None
                raise
            try:
                self._spawn(vm, rt)
            except BaseException:
                # Create is all or nothing: a VMM that failed to start leaves no record.
                # Nor a process: when the spawn failed after exec (the record could not be
                # written: a full disk), forgetting the VM would leave its VMM running,
                # unmanaged, on the disk, and never reaped.
                child = rt.child
                if child is not None and child.poll() is None:
                    _kill(child.pid)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(timeout=5)
                self._forget(vm_id)
                raise
        return 201, self._public(vm)

    def _foreign_disks(self) -> list[tuple[str, str, tuple[int, int] | None]]:
        """(id, disk path, device and inode) of each disk a VMM this daemon did not start
        has open. A relative path is the VMM's own: it is looked up from its cwd."""
        found = []
        for doc in self._foreign():
            disk = doc.get("disk")
            if isinstance(disk, str) and disk:
                where = disk if disk.startswith("/") else f"{procs.PROC}/{doc['pid']}/cwd/{disk}"
                found.append((str(doc["id"]), disk, disk_identity(where)))
        return found

    def _check_disk_free(
        self, disk: str, foreign: list[tuple[str, str, tuple[int, int] | None]]
    ) -> None:
        """409 when a live VM uses this disk by any name: the same path, or the same file
        (device and inode) through a hard link, a symlink or a bind mount. `foreign` are
        the disks of VMMs this daemon did not start (_foreign_disks): a second VMM on
        their image would corrupt it just the same."""
        wanted = disk_identity(disk)
        users = [
            (other.id, other.disk, tuple(other.disk_id) if other.disk_id else None)
            for other in self._vms.values()
            if other.state in p.LIVE_STATES
        ]
        for other_id, other_disk, recorded in [*users, *foreign]:
            same = other_disk == disk
            if not same and wanted is not None:
                # A relative path (a foreign VMM's) says nothing from the daemon's cwd.
                now = disk_identity(other_disk) if other_disk.startswith("/") else None
                same = wanted in (recorded, now)
            if same:
                raise ApiError(
                    409,
                    p.ERR_CONFLICT,
                    f"{disk} is in use by VM {other_id} (as {other_disk})",
                    {"field": "disk", "id": other_id},
                )

    def _new_id(self) -> str:
        with self._lock:
            while True:
                candidate = f"vm-{secrets.token_hex(3)}"
                if candidate not in self._vms:
                    return candidate

    def _forget(self, vm_id: str) -> None:
        with self._lock:
            self._vms.pop(vm_id, None)
            self._rt.pop(vm_id, None)
            self._unsaved.discard(vm_id)
            # Until the directory is gone, a create of this name is refused (409), not
            # raced: it would mkdir into a half-removed folder and then remove it too.
            self._removing.add(vm_id)
        try:
            target = self._removable_dir(vm_id)
            if target is not None:
                shutil.rmtree(target, ignore_errors=True)
            self.socket_path(vm_id).unlink(missing_ok=True)
        finally:
            with self._lock:
                self._removing.discard(vm_id)
            self._path_cache.pop(vm_id, None)
            self.generation += 1

    def _removable_dir(self, vm_id: str) -> Path | None:
        """The VM's directory when it is really one directly inside the records dir: a
        removal never follows a symlink or an id out of the state dir."""
        if not p.VM_ID_RE.fullmatch(vm_id):
            log.error("refusing to remove a VM directory for the id %r", vm_id)
            return None
        path = self.vm_dir(vm_id)
        if path.is_symlink() or not path.is_dir():
            return None
        if path.resolve().parent != self.settings.records_dir.resolve():
            log.error("refusing to remove %s: not inside %s", path, self.settings.records_dir)
            return None
        return path

    def _spawn(self, vm: Vm, rt: _Runtime) -> None:
        """Start the VMM and wait for vmm.ping. Called with the VM's action lock held."""
        sock = self.socket_path(vm.id)
        sock.unlink(missing_ok=True)  # v42 refuses to bind over a stale socket
        before = (vm.state, vm.exit, vm.pid, vm.pid_start)
        vm.state, vm.exit, vm.pid, vm.pid_start = p.STATE_STARTING, None, None, None
        # Record first: if the daemon dies during the spawn, re-adoption finds the VMM
        # by its socket path. No record, no VMM.
        self._persist(vm)
        if vm.id in self._unsaved:
            with self._lock:
                vm.state, vm.exit, vm.pid, vm.pid_start = before
            self._unsaved.discard(vm.id)
            raise StorageFullError(
                f"no space left in {self.settings.state_dir} for the record of VM {vm.id}; "
                "nothing was started"
            )
        d = self.vm_dir(vm.id)
        for name in (SERIAL_LOG, VMM_STDERR):
            (d / name).unlink(missing_ok=True)
        with (d / VMM_STDERR).open("wb") as err:
            child = subprocess.Popen(
                vm.argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                cwd=d,
                start_new_session=True,
                close_fds=True,
            )
        st = procs.stat(child.pid)
        with self._lock:
            rt.child, rt.expect_exit, rt.retire = child, False, False
            vm.pid, vm.pid_start = child.pid, st.start_ticks if st else None
            vm.started_at = time.time()
        self._persist(vm)
        self._wait_ready(vm, rt, child)

    def _wait_ready(self, vm: Vm, rt: _Runtime, child: subprocess.Popen[bytes]) -> None:
        api = ChApi(str(self.socket_path(vm.id)), timeout=2.0)
        deadline = time.monotonic() + self.settings.vmm_ready_timeout
        delay = 0.01
        while True:
            code = child.poll()
            if code is not None:
                self._startup_failed(vm, rt, code)
            if self.socket_path(vm.id).exists():
                try:
                    api.ping()
                    break
                except (ChApiError, ChUnreachableError):
                    pass
            if time.monotonic() > deadline:
                rt.expect_exit = True
                _kill(child.pid)
                child.wait(timeout=5)
                self._startup_failed(vm, rt, None, timeout=True)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        self._refresh_state(vm)
        if vm.state == p.STATE_STARTING:
            with self._lock:
                vm.state = p.STATE_RUNNING
        self._persist(vm)

    def _startup_failed(
        self, vm: Vm, rt: _Runtime, code: int | None, timeout: bool = False
    ) -> None:
        tail = self.log_tail(vm.id)
        self._mark_exited(vm, code, None, reason="the VMM failed to start")
        details = {"id": vm.id, "exit_code": code, "stderr_tail": tail}
        if any(KVM_FAILURE in line for line in tail):
            raise ApiError(
                503,
                p.ERR_KVM_UNAVAILABLE,
                "cloud-hypervisor cannot use KVM: check that /dev/kvm exists and is usable "
                "(VT-x/AMD-V enabled in firmware, kvm_intel or kvm_amd loaded)",
                details,
            )
        what = (
            f"did not answer vmm.ping within {self.settings.vmm_ready_timeout:g} s"
            if timeout
            else f"exited with code {code} while starting"
        )
        # Its own last words on stderr ("Error booting VM: ..."), in the message itself:
        # the failed VM is forgotten, and the dashboard shows only the message.
        said = [line for line in tail_lines(self.vm_dir(vm.id) / VMM_STDERR, 5) if line.strip()]
        why = f": {said[-1].strip()[:300]}" if said else ""
        raise ApiError(502, p.ERR_VMM_FAILED, f"cloud-hypervisor {what}{why}", details)

    # ---- actions --------------------------------------------------------------------

    def action(self, vm_id: str, action: str, timeout: int) -> dict[str, Any]:
        vm = self._find(vm_id)
        rt = self._rt[vm.id]
        if not rt.action.acquire(timeout=0.5):
            raise ApiError(
                409,
                p.ERR_BUSY,
                f"VM {vm.id} is busy ({rt.action_name})",
                {"id": vm.id, "action": rt.action_name},
            )
        try:
            rt.action_name = action
            handler: Callable[[Vm, _Runtime, int], None] = getattr(self, f"_do_{action}")
            handler(vm, rt, timeout)
        finally:
            rt.action_name = ""
            rt.action.release()
        self._check_saved(vm, f"VM {vm.id} is {vm.state} ({action} done)")
        return self._public(vm)

    def _require(self, vm: Vm, *states: str) -> None:
        if vm.state not in states:
            raise ApiError(
                409,
                p.ERR_CONFLICT,
                f"VM {vm.id} is {vm.state}; this needs it {' or '.join(states)}",
                {"id": vm.id, "state": vm.state},
            )

    def _api(self, vm: Vm) -> ChApi:
        return ChApi(str(self.socket_path(vm.id)), timeout=5.0)

    def _put(self, vm: Vm, endpoint: str) -> None:
        try:
            self._api(vm).put(endpoint)
        except ChApiError as e:
            raise ApiError(
                409,
                p.ERR_CONFLICT,
                f"cloud-hypervisor refused {endpoint}: {e.reason}",
                {"id": vm.id, "vmm_status": e.status},
            ) from e
        except ChUnreachableError as e:
            raise ApiError(
                502,
                p.ERR_VMM_FAILED,
                f"cloud-hypervisor of VM {vm.id} does not answer: {e}",
                {"id": vm.id},
            ) from e

    def _do_start(self, vm: Vm, rt: _Runtime, timeout: int) -> None:
        self._require(vm, p.STATE_STOPPED, p.STATE_FAILED)
        ch_path = self.preflight()
        foreign = self._foreign_disks()
        with self._lock:
            self._check_disk_free(vm.disk, foreign)
            vm.argv[0] = ch_path
            # Claim the disk before the lock drops: two stopped VMs on one disk started at
            # once would otherwise both pass the check and boot two VMMs on one image.
            previous, vm.state = vm.state, p.STATE_STARTING
        try:
            self._spawn(vm, rt)
        except StorageFullError:
            with self._lock:
                vm.state = previous  # no VMM was started
            raise
        except ApiError:
            raise  # _startup_failed recorded the exit
        except BaseException:
            # No VMM came of it (exec failed, state dir unwritable): release the claim.
            if vm.state == p.STATE_STARTING and vm.pid is None:
                with self._lock:
                    vm.state = p.STATE_FAILED
                with contextlib.suppress(OSError):
                    self._persist(vm)
            raise

    def _do_pause(self, vm: Vm, rt: _Runtime, timeout: int) -> None:
        self._require(vm, p.STATE_RUNNING)
        self._put(vm, "vm.pause")
        self._refresh_state(vm)

    def _do_resume(self, vm: Vm, rt: _Runtime, timeout: int) -> None:
        self._require(vm, p.STATE_PAUSED)
        self._put(vm, "vm.resume")
        self._refresh_state(vm)

    def _do_reboot(self, vm: Vm, rt: _Runtime, timeout: int) -> None:
        # vm.reboot is a VMM-side reset: the guest is not asked.
        self._require(vm, p.STATE_RUNNING, p.STATE_PAUSED)
        self._put(vm, "vm.reboot")
        self._refresh_state(vm)

    def _do_shutdown(self, vm: Vm, rt: _Runtime, timeout: int) -> None:
        self._require(vm, *p.LIVE_STATES)
        self._escalate(vm, rt, graceful_wait=float(timeout))

    def _do_stop(self, vm: Vm, rt: _Runtime, timeout: int) -> None:
        self._require(vm, *p.LIVE_STATES)
        self._escalate(vm, rt, graceful_wait=None)

    def _escalate(
        self, vm: Vm, rt: _Runtime, graceful_wait: float | None, reason: str | None = None
    ) -> None:
        """power-button (graceful only), then vm.shutdown + vmm.shutdown, SIGTERM, SIGKILL:
        each step only if the one before did not end the process in time."""
        rt.expect_exit = True
        started = time.monotonic()
        steps: list[dict[str, Any]] = []
        api = self._api(vm)

        def attempt(name: str, wait: float, do: Callable[[], None]) -> bool:
            entry: dict[str, Any] = {"step": name, "at": time.time()}
            try:
                do()
                entry["result"] = "sent"
            except (ChApiError, ChUnreachableError, OSError) as e:
                entry["result"] = f"failed: {e}"
                wait = min(wait, FAILED_STEP_WAIT)
            exited = self._wait_exit(vm, rt, wait)
            entry["exited"] = exited
            steps.append(entry)
            return exited

        def both_shutdowns() -> None:
            with contextlib.suppress(ChApiError):
                api.put("vm.shutdown")
            api.put("vmm.shutdown")

        pid, pid_start = vm.pid, vm.pid_start
        ladder: list[tuple[str, float, Callable[[], None]]] = []
        if graceful_wait is not None:
            if vm.state == p.STATE_PAUSED:
                steps.append(
                    {
                        "step": "vm.power-button",
                        "at": time.time(),
                        "result": "skipped: the VM is paused",
                        "exited": False,
                    }
                )
            else:
                ladder.append(
                    ("vm.power-button", graceful_wait, lambda: api.put("vm.power-button"))
                )
        ladder += [
            ("vm.shutdown+vmm.shutdown", STEP_WAIT["vm.shutdown+vmm.shutdown"], both_shutdowns),
            ("SIGTERM", STEP_WAIT["SIGTERM"], lambda: _signal(pid, pid_start, signal.SIGTERM)),
            ("SIGKILL", STEP_WAIT["SIGKILL"], lambda: _signal(pid, pid_start, signal.SIGKILL)),
        ]
        for name, wait, do in ladder:
            if attempt(name, wait, do):
                break
        with self._lock:
            vm.last_shutdown = {
                "graceful": graceful_wait is not None,
                "steps": steps,
                "seconds": round(time.monotonic() - started, 3),
            }
        exited = self._exit_status(vm, rt)
        if exited is None:
            self._persist(vm)
            raise ApiError(
                500, p.ERR_INTERNAL, f"VM {vm.id} survived SIGKILL", {"id": vm.id, "steps": steps}
            )
        self._mark_exited(vm, *exited, reason=reason)

    def _wait_exit(self, vm: Vm, rt: _Runtime, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while True:
            if self._exit_status(vm, rt) is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def delete(self, vm_id: str) -> dict[str, Any]:
        vm = self._find(vm_id)
        rt = self._rt[vm.id]
        if not rt.action.acquire(timeout=0.5):
            raise ApiError(409, p.ERR_BUSY, f"VM {vm.id} is busy ({rt.action_name})", {"id": vm.id})
        try:
            if vm.state in p.LIVE_STATES:
                raise ApiError(
                    409,
                    p.ERR_CONFLICT,
                    f"VM {vm.id} is {vm.state}; shut it down or stop it first",
                    {"id": vm.id, "state": vm.state},
                )
            self._forget(vm.id)
        finally:
            rt.action.release()
        return {"deleted": vm.id}

    def stop_all(self, timeout: int) -> list[dict[str, Any]]:
        """Graceful shutdown of every live VM in parallel (before a host reboot)."""
        with self._lock:
            live = [vm.id for vm in self._vms.values() if vm.state in p.LIVE_STATES]
        results: list[dict[str, Any]] = []
        threads = [
            threading.Thread(target=self._stop_one, args=(i, timeout, results)) for i in live
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def _stop_one(self, vm_id: str, timeout: int, results: list[dict[str, Any]]) -> None:
        try:
            doc = self.action(vm_id, "shutdown", timeout)
            results.append({"id": vm_id, "state": doc["state"]})
        except StorageFullError as e:
            results.append({"id": vm_id, "state": e.details["vm"]["state"], "saved": False})
        except ApiError as e:
            results.append({"id": vm_id, "error": e.message})

    def persist_all(self) -> None:
        with self._lock:
            vms = list(self._vms.values())
        for vm in vms:
            self._persist(vm)


_DIGITS = re.compile(r"[0-9]{1,18}")


def _printable(path: Path) -> str:
    return str(path).encode("unicode_escape", "replace").decode("ascii")


def parse_events(text: str) -> list[dict[str, Any]]:
    """The event monitor's objects. v42 writes each one pretty-printed (several lines,
    then a blank line), not one per line; a tail may start mid-object, so skip to the
    next object start after anything that does not decode."""
    decoder = json.JSONDecoder()
    events: list[dict[str, Any]] = []
    pos = text.find("{")
    while 0 <= pos < len(text):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(obj, dict):
            events.append(obj)
        pos = text.find("{", end)
    return events


def _signal(pid: int | None, start: int | None, sig: signal.Signals) -> None:
    """Signal the VMM, never whoever holds its PID now. A re-adopted VMM is not our child:
    once it exits, init reaps it and the PID can be reused before the next step of the
    ladder. A pidfd pins the process; its start time, read after the pidfd is open,
    proves which one it is."""
    if not pid:
        return
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError) as e:
        if isinstance(e, ProcessLookupError):
            raise
        # No pidfd (old kernel): check, then kill, with the small window that leaves.
        if not procs.is_alive(pid, start):
            raise ProcessLookupError(f"process {pid} is no longer the VMM") from None
        os.kill(pid, sig)
        return
    try:
        if not procs.is_alive(pid, start):
            raise ProcessLookupError(f"process {pid} is no longer the VMM")
        signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def tail_lines(path: Path, lines: int, max_bytes: int = 16384) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _option_value(argv: list[str], flag: str, key: str) -> str | None:
    """`--cpus boot=4,max=8` -> '4' for key 'boot' (also the `--flag=value` form)."""
    for i, arg in enumerate(argv):
        value = None
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
        if value is None:
            continue
        for part in value.split(","):
            k, _, v = part.partition("=")
            if k == key:
                return v
    return None


def _size_mb(text: str | None) -> int | None:
    if not text:
        return None
    units = {"K": 1 / 1024, "M": 1, "G": 1024}
    number, unit = (text[:-1], text[-1]) if text[-1] in units else (text, "")
    if not _DIGITS.fullmatch(number):
        return None  # int() also reads '²'-free oddities like '٣' and '1_0'
    return int(int(number) * units[unit]) if unit else int(number) // 2**20


def unmanaged_id(pid: int) -> str:
    return f"pid-{pid}"


def foreign_doc(pid: int, argv: list[str], st: procs.ProcStat, cpu: float) -> dict[str, Any]:
    cpus = _option_value(argv, "--cpus", "boot")
    return {
        "id": unmanaged_id(pid),
        "name": None,
        "managed": False,
        "state": p.STATE_RUNNING,
        "pid": pid,
        "cpus": int(cpus) if cpus and _DIGITS.fullmatch(cpus) else None,
        "memory_mb": _size_mb(_option_value(argv, "--memory", "size")),
        "disk": _option_value(argv, "--disk", "path"),
        "cpu_percent": cpu,
        "rss_mb": round(st.rss_bytes / 2**20, 1),
        "api_socket": _option_value(argv, "--api-socket", "path"),
    }
