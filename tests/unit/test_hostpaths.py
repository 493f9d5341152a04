"""tests.support.hostpaths: a test's writes outside tmp make what is missing and remove
exactly that (a fresh machine lacks /etc/conf.d; a used one may have it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.hostpaths import HostPaths, SharedDir, host_paths


def test_makes_missing_folders_and_removes_exactly_them(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    with host_paths() as made:
        conf = made.file(tmp_path / "etc" / "conf.d" / "sub" / "svc", "X=1\n", mode=0o600)
        assert conf.read_text() == "X=1\n"
        assert conf.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "etc" / "conf.d").exists()
    assert (tmp_path / "etc").is_dir(), "a folder that was there before stays"


def test_a_folder_someone_else_filled_stays(tmp_path: Path) -> None:
    made = HostPaths()
    made.file(tmp_path / "conf.d" / "mine", "")
    (tmp_path / "conf.d" / "theirs").write_text("")
    made.cleanup()
    assert sorted(p.name for p in (tmp_path / "conf.d").iterdir()) == ["theirs"]


def test_never_overwrites_a_file_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "svc").write_text("theirs")
    with host_paths() as made, pytest.raises(FileExistsError):
        made.file(tmp_path / "svc", "mine")
    assert (tmp_path / "svc").read_text() == "theirs"


def test_a_shared_folder_goes_with_its_last_user(tmp_path: Path) -> None:
    shared = SharedDir(tmp_path / "run" / "sshd")
    shared.acquire()
    shared.acquire()
    shared.release()
    assert shared.path.is_dir(), "still in use by the second user"
    shared.release()
    assert not (tmp_path / "run").exists()
    existing = SharedDir(tmp_path)
    existing.acquire()
    existing.release()
    assert tmp_path.is_dir(), "a folder that existed before is not removed"
