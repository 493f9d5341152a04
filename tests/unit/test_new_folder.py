"""new_folder.make: the folder a command writes into, made one level deep."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from spk_visor import new_folder
from spk_visor.errors import UsageError


@pytest.fixture
def umask_027() -> Iterator[None]:
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_users_umask_is_kept(tmp_path: Path, umask_027: None) -> None:
    """build --out and shim-iso --out made their folder 0755 whatever the umask (a plain
    mkdir, as before, respects it)."""
    new_folder.make(tmp_path / "out", "--out out/b.spkb")
    assert mode(tmp_path / "out") == 0o750


def test_a_mode_asked_for_is_exact(tmp_path: Path, umask_027: None) -> None:
    """A private key's folder is 0700, whatever the umask."""
    os.umask(0o002)
    new_folder.make(tmp_path / "keys", "keys/rel", 0o700)
    assert mode(tmp_path / "keys") == 0o700


def racing_mkdir(monkeypatch: pytest.MonkeyPatch, make_it: str) -> None:
    """Another process (a second build) makes the folder, or a file there, just before
    this one's mkdir: after every check."""
    mkdir = Path.mkdir

    def mkdir_too_late(self: Path, mode: int = 0o777, *args: object, **kw: object) -> None:
        if make_it == "folder":
            mkdir(self)
        else:
            self.write_text("x")
        mkdir(self, mode, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir_too_late)


def test_a_folder_made_by_someone_else_meanwhile_is_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "out"
    racing_mkdir(monkeypatch, "folder")
    new_folder.make(folder, "--out out/b.spkb")
    assert folder.is_dir()


@pytest.mark.parametrize("race", [False, True])
def test_a_file_where_the_folder_goes_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, race: bool
) -> None:
    folder = tmp_path / "out"
    if race:
        racing_mkdir(monkeypatch, "file")
    else:
        folder.write_text("x")
    with pytest.raises(UsageError) as e:
        new_folder.make(folder, "--out out/b.spkb")
    assert e.value.message == f"--out out/b.spkb: {folder} is a file, not a folder"
    assert folder.read_text() == "x"
