"""Crash safety of record writes, and the token file's life."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smechvisord import atomic, token


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
