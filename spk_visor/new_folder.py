"""A folder a command writes into is made only one level deep: the folder itself, in a
folder that exists. A path that needs more (`--repo /srv/updaets/repo`, `keygen
kyes/rel/root1`) is most likely a typo, and silently making a tree for it hides the
mistake; the user makes the folders above it if they meant them (as ssh-keygen asks)."""

from __future__ import annotations

from pathlib import Path

from spk_visor.errors import UsageError


def check(folder: Path, what: str) -> None:
    """Refuse `folder` (named by `what`, e.g. "--repo DIR") if it is missing and so is the
    folder it would be made in; nothing is made."""
    if folder.exists() or folder.parent.exists() or folder == folder.parent:
        return
    top = folder.parent
    while not top.parent.exists() and top != top.parent:
        top = top.parent
    raise UsageError(
        f"{what}: the folder {top} does not exist",
        f"create it first (mkdir -p {folder.parent}) or fix the path; only {folder.name}/ "
        "itself is made",
    )


def make(folder: Path, what: str, mode: int | None = None) -> None:
    """`folder`, made if missing (see check): as the umask says, or exactly `mode` (a
    private key's 0700) when given. A folder already there, or made meanwhile by another
    process, is kept as it is; a file there is refused."""
    check(folder, what)
    try:
        if mode is None:
            folder.mkdir()
        else:
            folder.mkdir(mode=mode)
            folder.chmod(mode)  # mkdir's mode is cut by the umask; this one must be exact
    except FileExistsError:
        pass
    if not folder.is_dir():
        raise UsageError(
            f"{what}: {folder} is a file, not a folder",
            f"move {folder} out of the way or give another path",
        )
