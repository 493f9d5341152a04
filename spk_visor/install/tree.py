"""Release trees: the daemon pack unpacked, verified and staged, for OTA and deploy alike.

    releases/.staging-<id>/   unpacked file by file (each file's sha256 and size against
                              the manifest, every write completed), symlinks made, the
                              whole tree verified, directories made read-only, fsynced
    releases/<id>/            the staging tree renamed into place, the directory fsynced

The staging name is the one OTA's recovery removes (`.staging-*`), whoever left it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from spk_visor.errors import VerificationError
from spk_visor.install import blockdev
from spk_visor.ota import durable
from spk_visor.trust.manifest import DaemonComponent

STAGING_PREFIX = ".staging-"
READ_CHUNK = 1 << 20
_SAFE_ID = re.compile(r"[^A-Za-z0-9._+-]")


def release_id(component: DaemonComponent, manifest_hex: str) -> str:
    """`<version>-<manifest8>`, reduced to characters safe in one path component."""
    rid = _SAFE_ID.sub("_", f"{component.version}-{manifest_hex[:8]}").lstrip(".")
    return rid[-96:] or manifest_hex[:8]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_tree(root: Path, component: DaemonComponent) -> list[str]:
    """Differences between the tree at `root` and `component` ([] when identical).

    Files must match in size, sha256 and mode (the manifest's, write bits removed),
    symlinks in target; anything else present is reported too.
    """
    if not root.is_dir() or root.is_symlink():
        return [f"{root}: not a release directory"]
    problems: list[str] = []
    expected_dirs = {""}
    for entry_path in [f.path for f in component.files] + [s.path for s in component.symlinks]:
        parts = entry_path.split("/")
        expected_dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for f in component.files:
        path = root / f.path
        try:
            st = path.lstat()
        except FileNotFoundError:
            problems.append(f"{f.path}: missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{f.path}: not a regular file")
        elif st.st_size != f.size:
            problems.append(f"{f.path}: {st.st_size} bytes, manifest says {f.size}")
        elif sha256_file(path) != f.sha256:
            problems.append(f"{f.path}: content differs from the manifest (sha256)")
        elif stat.S_IMODE(st.st_mode) != f.mode & 0o555:
            problems.append(f"{f.path}: mode {stat.S_IMODE(st.st_mode):o}, want {f.mode & 0o555:o}")
    for s in component.symlinks:
        path = root / s.path
        if not path.is_symlink():
            problems.append(f"{s.path}: not a symlink")
        elif os.readlink(path) != s.target:
            problems.append(f"{s.path}: points to {os.readlink(path)!r}, want {s.target!r}")
    known = {f.path for f in component.files} | {s.path for s in component.symlinks}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        rel = "" if rel == "." else rel
        if rel not in expected_dirs:
            problems.append(f"{rel}: unexpected directory")
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            path_rel = f"{rel}/{name}" if rel else name
            if path_rel not in known:
                problems.append(f"{path_rel}: not in the manifest")
    return problems


def rmtree(path: Path) -> None:
    """Remove a (read-only) release or staging tree."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    for dirpath, dirnames, _files in os.walk(path):
        os.chmod(dirpath, 0o700)
        for d in dirnames:
            if not Path(dirpath, d).is_symlink():
                os.chmod(Path(dirpath, d), 0o700)
    shutil.rmtree(path)


def unpack(pack: Path, component: DaemonComponent, staging: Path) -> None:
    """The pack's files (concatenated in manifest order, no headers) into a new `staging`
    directory, each checked against its signed size and sha256, modes without write bits.
    VerificationError when the pack is missing, of the wrong size, or any file differs."""
    try:
        size = pack.stat().st_size
    except FileNotFoundError:
        raise VerificationError(
            f"the daemon pack {component.pack[:19]}… is not in the store",
            "fetch or push the release again",
        ) from None
    if size != component.tree_size:
        raise VerificationError(
            f"the daemon pack holds {size} bytes, the manifest's files {component.tree_size}"
        )
    staging.mkdir(mode=0o755)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with pack.open("rb", buffering=0) as src:
        for f in component.files:
            dest = staging / f.path
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = os.open(dest, flags, 0o600)
            try:
                digest = hashlib.sha256()
                remaining = f.size
                while remaining:
                    chunk = src.read(min(READ_CHUNK, remaining))
                    if not chunk:
                        raise VerificationError(f"the daemon pack ends inside {f.path}")
                    digest.update(chunk)
                    blockdev.write_all(fd, chunk)
                    remaining -= len(chunk)
                if digest.hexdigest() != f.sha256:
                    raise VerificationError(
                        f"{f.path} in the daemon pack does not match its signed hash",
                        "the pack is damaged; nothing was changed",
                    )
                # Modes from the manifest (already masked to 0o755), write bits off.
                os.fchmod(fd, f.mode & 0o555)
            finally:
                os.close(fd)
        if src.read(1):
            raise VerificationError("the daemon pack has bytes after its last file")
    for s in component.symlinks:
        link = staging / s.path
        link.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.symlink(s.target, link)


def stage(
    releases: Path,
    rid: str,
    pack: Path,
    component: DaemonComponent,
    before_rename: Callable[[], None] | None = None,
) -> Path:
    """Unpack, verify, make read-only and fsync under .staging-<rid>, then rename to
    releases/<rid> (which must not exist). Nothing is left behind on failure.
    `before_rename` runs once the staged tree is complete and durable (a crash point)."""
    releases.mkdir(parents=True, exist_ok=True, mode=0o755)
    final = releases / rid
    staging = releases / f"{STAGING_PREFIX}{rid}"
    if staging.exists() or staging.is_symlink():
        rmtree(staging)
    try:
        unpack(pack, component, staging)
        problems = verify_tree(staging, component)
        if problems:
            raise VerificationError(f"the staged release does not verify: {problems[0]}")
        for dirpath, _dirs, _files in os.walk(staging, topdown=False):
            os.chmod(dirpath, 0o555)  # noqa: S103 - read-only for all: releases are immutable
        durable.fsync_tree(staging)
        if before_rename is not None:
            before_rename()
        os.rename(staging, final)
        durable.fsync_dir(releases)
    except BaseException:
        with contextlib.suppress(OSError):
            rmtree(staging)
        raise
    return final
