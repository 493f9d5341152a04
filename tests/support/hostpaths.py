"""Writes a test makes outside its temporary folder (/etc/init.d, /etc/conf.d, /run/...).

A fresh Debian machine lacks some of the folders the tests write into (Debian's openrc does
not ship /etc/conf.d), and a machine an earlier run used may have them. So a test never
assumes either: it writes through a HostPaths, which creates each missing folder on the way,
refuses to overwrite a file it did not make, and on cleanup removes exactly what it made,
files first, then its folders, deepest first (a folder someone else filled meanwhile stays).

Folders shared by tests that overlap in time (sshd's privilege-separation folder, used by
several sshd at once) are counted: the last user removes the folder, if it made it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path


class HostPaths:
    def __init__(self) -> None:
        self._files: list[Path] = []
        self._dirs: list[Path] = []

    def dir(self, path: Path, mode: int = 0o755) -> Path:
        """`path` as a folder, creating it and any missing parent (remembered for cleanup)."""
        missing = []
        for p in (path, *path.parents):
            if p.is_dir():
                break
            missing.append(p)
        for p in reversed(missing):
            p.mkdir(mode=mode)
            self._dirs.append(p)
        return path

    def file(self, path: Path, text: str, mode: int = 0o644) -> Path:
        """Write a new file at `path` (its folder made if missing). An existing file is not
        ours to change, so that is an error rather than a silent overwrite."""
        self.dir(path.parent)
        with path.open("x") as f:
            self._files.append(path)
            f.write(text)
        path.chmod(mode)
        return path

    def adopt(self, path: Path) -> Path:
        """Remember a file a tool made for us at `path` (e.g. a copy), to remove it later."""
        self._files.append(path)
        return path

    def cleanup(self) -> None:
        for f in reversed(self._files):
            f.unlink(missing_ok=True)
        self._files.clear()
        for d in reversed(self._dirs):
            with contextlib.suppress(OSError):  # not empty: someone else's files are in it
                d.rmdir()
        self._dirs.clear()


@contextlib.contextmanager
def host_paths() -> Iterator[HostPaths]:
    paths = HostPaths()
    try:
        yield paths
    finally:
        paths.cleanup()


class SharedDir:
    """A folder several concurrent users need (e.g. /run/sshd for every sshd a test runs):
    made by the first user if missing, removed by the last one if it was made here."""

    def __init__(self, path: Path, mode: int = 0o755) -> None:
        self.path = path
        self.mode = mode
        self._lock = threading.Lock()
        self._users = 0
        self._paths: HostPaths | None = None

    def acquire(self) -> Path:
        with self._lock:
            if self._users == 0:
                self._paths = HostPaths()
                self._paths.dir(self.path, self.mode)
            self._users += 1
        return self.path

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._paths is not None:
                self._paths.cleanup()
                self._paths = None
