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
from pathlib import Path
from typing import Any

from spk_visor.errors import BusyError, OperatorNeededError
from spk_visor.ota import durable
from spk_visor.ota.nodeconf import NodePaths

# Phases of the daemon live swap (ota.md, "Daemon class").
DAEMON_PHASES = (
    "idle",
    "fetching",
    "staging",
    "preflight",
    "switching",
    "probation",
    "committed",
    "rolling_back",
    "rolled_back",
    "failed",
)
# Phases of the base image (ota.md, "Base system class").
BASE_PHASES = (
    "idle",
    "fetching",
    "invalidating",
    "writing",
    "verifying",
    "staged",
    "trial",
    "committed",
    "trial_failed",
    "rolled_back",
    "discarded",
    "failed",
)
TERMINAL = frozenset({"idle", "committed", "rolled_back", "failed", "discarded", "trial_failed"})
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
        """Record `phase` durably, then pass the crash point named after it."""
        doc = self.read()
        entry = dict(doc.get(component) or {})
        entry.update(fields)
        previous = entry.get("phase")
        entry["phase"] = phase
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
