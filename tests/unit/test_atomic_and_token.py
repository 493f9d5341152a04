"""Crash safety of record writes, and the token file's life."""

from __future__ import annotations

import grp
import os
from pathlib import Path

import pytest

from smechvisord import atomic, settings, token


def test_write_json_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"a": 2})
    assert target.read_text() == '{\n "a": 2\n}\n'
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_a_crash_mid_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    target = tmp_path / "record.json"
    atomic.write_json(target, {"generation": 1})

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(OSError, match="No space"):
        atomic.write_json(target, {"generation": 2})
    monkeypatch.undo()
    assert target.read_text() == '{\n "generation": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temp file left


def test_token_is_created_0600_once(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "token"
    first = token.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert len(first) >= 32
    assert token.load_or_create(path) == first


def test_loose_token_permissions_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("x" * 40 + "\n")
    os.chmod(path, 0o644)
    assert token.load_or_create(path) == "x" * 40
    assert path.stat().st_mode & 0o777 == 0o600


def test_short_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("abc\n")
    with pytest.raises(token.TokenError, match="fewer than"):
        token.load_or_create(path)


def test_token_comparison() -> None:
    assert token.matches("secret-value", "secret-value")
    assert not token.matches("secret-value", "secret-valuf")
    assert not token.matches("secret-value", "")


def own_group() -> str:
    """A group this process may give its files (its own) without being root."""
    return grp.getgrgid(os.getegid()).gr_name


def test_token_is_shared_with_the_token_group(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "token"
    first = token.load_or_create(path, own_group())
    assert (path.stat().st_mode & 0o777, path.stat().st_gid) == (0o640, os.getegid())
    # Members pass through the folder to the token, but cannot list it.
    assert path.parent.stat().st_mode & 0o777 == 0o710
    assert token.load_or_create(path, own_group()) == first


def test_a_group_that_does_not_exist_keeps_the_token_private(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "token"
    token.load_or_create(path, "no-such-group-here")
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_a_private_token_is_shared_once_the_group_exists(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "token"
    first = token.load_or_create(path, "")
    assert path.stat().st_mode & 0o777 == 0o600
    assert token.load_or_create(path, own_group()) == first
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_token_others_can_read_loses_that_even_with_a_group(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("x" * 40 + "\n")
    os.chmod(path, 0o666)  # noqa: S103 (the loose mode under test)
    assert token.load_or_create(path, own_group()) == "x" * 40
    assert path.stat().st_mode & 0o777 == 0o640


def test_the_token_group_setting_is_checked() -> None:
    assert settings.load([], environ={}).token_group == "smechvisor"
    assert settings.load(["--token-group", ""], environ={}).token_group == ""
    with pytest.raises(settings.SettingsError, match="not a group name"):
        settings.load([], environ={"SMECHVISORD_TOKEN_GROUP": "Admins; rm"})
