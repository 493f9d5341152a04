"""`--overlay DIR`: files laid over a built image, made into a new image in seconds.

A site adds its own health.d checks or settings this way, and the tests make the next
release's base (a marker file, a failing check) without building Debian again. The base
image is built (or taken from the cache) first; its tree is copied in name order onto a
tmpfs, the overlay is copied over it, and ext4.make writes the result with the same
reproducibility rules. The overlay's files keep their modes and belong to root; a file
replaces what was at its path, a directory merges. The sealing rules still hold: the
build refuses an overlay that brings a compiler.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from spk_visor.errors import UsageError
from spk_visor.image import ext4, rootfs
from spk_visor.image.pyenv import ImageBuildError, run


def check(overlay: Path) -> None:
    """Refuse (exit 2) what cannot be laid over an image: not a directory, or an entry
    that is neither a directory, a regular file nor a symlink."""
    if not overlay.is_dir():
        raise UsageError(f"--overlay {overlay} is not a directory")
    for dirpath, dirnames, filenames in os.walk(overlay):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                raise UsageError(
                    f"--overlay: {path} is not a file, a directory or a symlink",
                    "an overlay holds only those",
                )


def key(base_key: str, overlay: Path) -> str:
    """The overlaid image's key: the base image's and the overlay's content (paths,
    modes, bytes, link targets)."""
    digest = hashlib.sha256(f"overlay/1\0{base_key}\0".encode())
    for dirpath, dirnames, filenames in os.walk(overlay):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            digest.update(f"{path.relative_to(overlay).as_posix()}\0{st.st_mode:o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                digest.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def lay(overlay: Path, tree: Path) -> None:
    """Copy the overlay over `tree` in name order; what it copies belongs to root."""
    for name in sorted(os.listdir(overlay)):
        src, dst = overlay / name, tree / name
        st = src.lstat()
        if stat.S_ISDIR(st.st_mode):
            if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
                dst.unlink()
            if not dst.exists():
                dst.mkdir()
                os.chmod(dst, stat.S_IMODE(st.st_mode))
                os.chown(dst, 0, 0)
            lay(src, dst)
            continue
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.is_symlink() or dst.exists():
            dst.unlink()
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copyfile(src, dst)
            os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.chown(dst, 0, 0, follow_symlinks=False)


@contextlib.contextmanager
def mounted_ro(image: Path) -> Iterator[Path]:
    """The image loop-mounted read-only (no journal replay) on a fresh directory."""
    mnt = Path(tempfile.mkdtemp(prefix="spk-image-base-"))
    try:
        run(["mount", "-o", "ro,loop,noload", "-t", "ext4", str(image), str(mnt)])
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True, timeout=120)
    finally:
        with contextlib.suppress(OSError):
            mnt.rmdir()


def make(
    base_image: Path,
    overlay: Path,
    out: Path,
    *,
    image_key: str,
    epoch: int,
    stage: Path,
    work: Path,
    label: str,
) -> int:
    """Write `base_image` with `overlay` laid over it to `out`; its size in bytes.
    `stage` is an empty directory (a tmpfs: the copy's order is then fixed)."""
    from spk_visor.image.build import sorted_copy  # noqa: PLC0415 (build imports us)

    with mounted_ro(base_image) as base:
        sorted_copy(base, stage)
    lay(overlay, stage)
    found = rootfs.compilers(stage)
    if found:
        raise ImageBuildError(f"the overlay brings compilers: {', '.join(found)}")
    return ext4.make(stage, out, key=image_key, epoch=epoch, work=work, label=label)
