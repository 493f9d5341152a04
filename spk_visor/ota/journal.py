"""The node's OTA bookkeeping: the apply journal, the floor, the history and the lock.

state.json is the single source of truth for what an update was doing when the power
went out. It holds one journal per component class ("daemon", "base"); each write
replaces the whole file atomically (tmp, fsync, rename, fsync dir) and bumps a
`transitions` counter, so a crash-and-retry loop trips the breaker at MAX_TRANSITIONS.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from spk_visor.errors import BusyError, OperatorNeededError, SpkVisorError, UsageError
from spk_visor.ota import durable
from spk_visor.ota.nodeconf import NodePaths


class DaemonPhase(StrEnum):
    """Phases of the daemon live swap (ota.md, "Daemon class")."""

    IDLE = "idle"
    STAGING = "staging"
    PREFLIGHT = "preflight"
    SWITCHING = "switching"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class BasePhase(StrEnum):
    """Phases of the base image (ota.md, "Base system class")."""

    IDLE = "idle"
    INVALIDATING = "invalidating"
    WRITING = "writing"
    VERIFYING = "verifying"
    STAGED = "staged"
    TRIAL = "trial"
    COMMITTED = "committed"
    TRIAL_FAILED = "trial_failed"
    ROLLED_BACK = "rolled_back"
    DISCARDED = "discarded"
    FAILED = "failed"


class OpPhase(StrEnum):
    """The operation as a whole (engine.py's "op" entry)."""

    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"


_D = DaemonPhase
_B = BasePhase
# The one transition table: journal.set refuses any other change of phase. A phase may
# always be written again (more fields, or the same step retried); `begin` starts every
# update from idle.
TRANSITIONS: dict[str, dict[str, frozenset[str]]] = {
    "daemon": {
        _D.IDLE: frozenset({_D.STAGING, _D.ROLLING_BACK}),  # an update, a manual rollback
        # staging again: the same update retried after an interruption; idle: staging
        # failed or was interrupted before any change; failed: the loop breaker.
        _D.STAGING: frozenset({_D.PREFLIGHT, _D.SWITCHING, _D.IDLE, _D.FAILED}),
        _D.PREFLIGHT: frozenset({_D.SWITCHING, _D.ROLLED_BACK, _D.IDLE, _D.STAGING, _D.FAILED}),
        _D.SWITCHING: frozenset(
            {_D.PROBATION, _D.ROLLING_BACK, _D.ROLLED_BACK, _D.COMMITTED, _D.FAILED}
        ),
        _D.PROBATION: frozenset(
            {_D.COMMITTED, _D.ROLLING_BACK, _D.ROLLED_BACK, _D.SWITCHING, _D.FAILED}
        ),
        # committed: a failed manual rollback put the release it left back in place.
        _D.ROLLING_BACK: frozenset({_D.ROLLED_BACK, _D.COMMITTED, _D.FAILED}),
        _D.COMMITTED: frozenset(),
        _D.ROLLED_BACK: frozenset({_D.STAGING}),
        _D.FAILED: frozenset({_D.STAGING}),
    },
    "base": {
        _B.IDLE: frozenset({_B.INVALIDATING}),
        _B.INVALIDATING: frozenset({_B.WRITING, _B.FAILED}),
        _B.WRITING: frozenset({_B.VERIFYING, _B.FAILED}),
        _B.VERIFYING: frozenset({_B.STAGED, _B.FAILED}),
        _B.STAGED: frozenset({_B.TRIAL, _B.TRIAL_FAILED, _B.DISCARDED}),
        _B.TRIAL: frozenset({_B.COMMITTED, _B.TRIAL_FAILED}),
        _B.TRIAL_FAILED: frozenset({_B.ROLLED_BACK}),
        _B.COMMITTED: frozenset(),
        _B.ROLLED_BACK: frozenset(),
        _B.DISCARDED: frozenset(),
        _B.FAILED: frozenset(),
    },
    "op": {
        OpPhase.IDLE: frozenset({OpPhase.RUNNING}),
        OpPhase.RUNNING: frozenset({OpPhase.DONE}),
        OpPhase.DONE: frozenset(),
    },
}
DAEMON_PHASES = tuple(DaemonPhase)
BASE_PHASES = tuple(BasePhase)
TERMINAL = frozenset({"idle", "committed", "rolled_back", "failed", "discarded", "trial_failed"})


class TransitionError(SpkVisorError):
    """A journal write the transition table does not allow: a bug, nothing is written."""


def check_transition(component: str, previous: str | None, phase: str) -> None:
    """TransitionError unless `previous` -> `phase` is in TRANSITIONS. A previous phase
    this version does not know (a journal from an older release) allows any phase."""
    table = TRANSITIONS.get(component)
    if table is None:
        raise TransitionError(f"the journal has no component {component!r}")
    if phase not in table:
        raise TransitionError(f"{component}: {phase!r} is not a phase")
    before = previous or "idle"
    if before == phase or before not in table:
        return
    if phase not in table[before]:
        raise TransitionError(f"{component}: no transition from {before!r} to {phase!r}")


# The journal keeps this many phase changes per update before it gives up on automatic
# attempts (a boot loop, a worker that keeps dying).
MAX_TRANSITIONS = 20
# Lines kept in history.jsonl when it is rotated.
HISTORY_KEEP = 2000
_MAX_STATE_BYTES = 1 << 20


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return {}
    if len(raw) > _MAX_STATE_BYTES:
        raise OperatorNeededError(f"{path} is larger than 1 MiB", "inspect and remove it")
    try:
        doc = json.loads(raw)
    except ValueError as e:
        # Atomic replacement means this is not a torn write but outside damage.
        raise OperatorNeededError(f"{path} is not valid JSON: {e}", "inspect it") from e
    if not isinstance(doc, dict):
        raise OperatorNeededError(f"{path} does not hold a JSON object", "inspect it")
    return doc


@dataclass
class Journal:
    """state.json: {"daemon": {...}, "base": {...}}, written whole on every change."""

    paths: NodePaths

    def read(self) -> dict[str, Any]:
        return _read_json(self.paths.journal)

    def get(self, component: str) -> dict[str, Any]:
        entry = self.read().get(component)
        return dict(entry) if isinstance(entry, dict) else {"phase": "idle"}

    def phase(self, component: str) -> str:
        return str(self.get(component).get("phase", "idle"))

    def set(self, component: str, phase: str, **fields: Any) -> dict[str, Any]:
        """Record `phase` durably, then pass the crash point named after it.
        TransitionError (nothing written) for a change the transition table forbids."""
        doc = self.read()
        entry = dict(doc.get(component) or {})
        entry.update(fields)
        previous = entry.get("phase")
        check_transition(component, previous if isinstance(previous, str) else None, phase)
        entry["phase"] = str(phase)
        entry["updated"] = now_iso()
        if previous != phase:
            entry["transitions"] = int(entry.get("transitions", 0)) + 1
        doc[component] = entry
        self.paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.write_json(self.paths.journal, doc)
        durable.crash_point(f"{component}:{phase}")
        return entry

    def begin(self, component: str, phase: str, **fields: Any) -> dict[str, Any]:
        """Start a new update: a fresh journal entry (transitions restart at 1)."""
        doc = self.read()
        doc[component] = {"phase": "idle", "transitions": 0}
        self.paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.write_json(self.paths.journal, doc)
        return self.set(component, phase, started=now_iso(), **fields)

    def over_budget(self, component: str) -> bool:
        return int(self.get(component).get("transitions", 0)) > MAX_TRANSITIONS


@dataclass
class Floor:
    """floor.json: anti-rollback counter, channel serials and the clock floor."""

    paths: NodePaths

    def read(self) -> dict[str, Any]:
        doc = _read_json(self.paths.floor)
        doc.setdefault("counter_floor", 0)
        doc.setdefault("channels", {})
        doc.setdefault("clock_floor", "")
        doc.setdefault("bad_manifests", [])
        return doc

    def write(self, doc: dict[str, Any]) -> None:
        self.paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.write_json(self.paths.floor, doc)

    def raise_to(self, counter: int) -> None:
        """Raise the counter floor; it never goes down (ota.md: only at commit)."""
        doc = self.read()
        if counter > int(doc["counter_floor"]):
            doc["counter_floor"] = counter
            self.write(doc)


@dataclass
class History:
    """history.jsonl: every decision, appended and fsynced."""

    paths: NodePaths

    def append(self, event: str, **fields: Any) -> None:
        self.paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = json.dumps({"time": now_iso(), "event": event, **fields}, sort_keys=True)
        fd = os.open(self.paths.history, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode() + b"\n")
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > 4 << 20:
            self._rotate()

    def _rotate(self) -> None:
        lines = self.paths.history.read_bytes().splitlines(keepends=True)
        durable.write_bytes(self.paths.history, b"".join(lines[-HISTORY_KEEP:]))

    def read(self, limit: int | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.paths.history.read_text().splitlines()
        except FileNotFoundError:
            return []
        except PermissionError as e:
            # The state folder is root's (0700) once an update ran: a user's mistake.
            raise UsageError(
                f"{e.filename}: permission denied",
                "the node's OTA state is root's: run it as root (sudo spk-visor ota ...)",
            ) from e
        out = []
        for line in lines[-limit:] if limit else lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


@contextlib.contextmanager
def locked(paths: NodePaths, command: str) -> Iterator[int]:
    """Hold the OTA lock for the block; a second holder gets BusyError (exit 6) at once."""
    paths.lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(
                f"another OTA operation is running ({lock_holder(paths) or 'unknown'})",
                "wait for it to finish: spk-visor ota status --follow",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        # The fd is yielded so a detached worker can inherit it: the flock belongs to the
        # open file description and so stays held for as long as the worker runs.
        yield fd
    finally:
        os.close(fd)


def lock_holder(paths: NodePaths) -> str | None:
    """ "PID COMMAND" of the lock's holder, or None when nobody holds it."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 512).decode(errors="replace").strip() or None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@dataclass
class Installed:
    """installed.json: what is committed on this node, written only at commit.

    {"manifest": hex, "counter": int, "version": str,
     "daemon": {"release": id, "manifest": hex, "pack": blob id, "version": str},
     "base": {"slot": "a"|"b", "manifest": hex, "raw_sha256": hex, "version": str}}
    """

    paths: NodePaths

    @property
    def path(self) -> Path:
        return self.paths.state_dir / "installed.json"

    def read(self) -> dict[str, Any]:
        return _read_json(self.path)

    def counter(self) -> int:
        return int(self.read().get("counter", 0) or 0)

    def record(
        self, component: str, entry: dict[str, Any], manifest_hex: str, counter: int, version: str
    ) -> None:
        doc = self.read()
        doc[component] = entry
        # The release counter of the node is that of the newest committed manifest.
        if counter >= int(doc.get("counter", 0) or 0):
            doc.update(manifest=manifest_hex, counter=counter, version=version)
        self.paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.write_json(self.path, doc)
