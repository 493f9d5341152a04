"""`image build --overlay DIR`: what the overlay lays over a tree, and its cache key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spk_visor.errors import UsageError
from spk_visor.image import overlay


def _overlay(tmp: Path) -> Path:
    ov = tmp / "ov"
    (ov / "etc/spk-visor/health.d/required").mkdir(parents=True)
    check = ov / "etc/spk-visor/health.d/required/90-site"
    check.write_text("#!/bin/sh\nexit 0\n")
    check.chmod(0o755)
    (ov / "etc/marker").write_text("base 2\n")
    (ov / "etc/marker").chmod(0o644)
    (ov / "etc/link").symlink_to("marker")
    (ov / "etc/was-a-dir").write_text("now a file\n")
    return ov


def _tree(tmp: Path) -> Path:
    tree = tmp / "tree"
    (tree / "etc/spk-visor/health.d/required").mkdir(parents=True)
    (tree / "etc/spk-visor/health.d/required/10-root").write_text("#!/bin/sh\n")
    (tree / "etc/marker").write_text("base 1\n")
    (tree / "etc/link").write_text("a file where the overlay has a link\n")
    (tree / "etc/was-a-dir/inner").mkdir(parents=True)
    return tree


def test_lay_merges_directories_and_replaces_files(tmp_path: Path) -> None:
    ov, tree = _overlay(tmp_path), _tree(tmp_path)
    overlay.lay(ov, tree)
    required = tree / "etc/spk-visor/health.d/required"
    assert sorted(p.name for p in required.iterdir()) == ["10-root", "90-site"]
    assert os.stat(required / "90-site").st_mode & 0o777 == 0o755
    assert (tree / "etc/marker").read_text() == "base 2\n"
    assert os.readlink(tree / "etc/link") == "marker"
    assert (tree / "etc/was-a-dir").read_text() == "now a file\n"
    # What the overlay brings belongs to root, whoever owned the overlay's files.
    assert (tree / "etc/marker").stat().st_uid == 0 or os.geteuid() != 0


def test_key_follows_content_and_modes(tmp_path: Path) -> None:
    ov = _overlay(tmp_path)
    first = overlay.key("a" * 64, ov)
    assert overlay.key("a" * 64, ov) == first
    assert overlay.key("b" * 64, ov) != first, "another base image is another image"
    (ov / "etc/marker").write_text("base 3\n")
    second = overlay.key("a" * 64, ov)
    assert second != first
    (ov / "etc/marker").chmod(0o600)
    assert overlay.key("a" * 64, ov) != second


def test_check_refuses_what_an_overlay_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a directory"):
        overlay.check(tmp_path / "missing")
    ov = _overlay(tmp_path)
    overlay.check(ov)
    os.mkfifo(ov / "etc/fifo")
    with pytest.raises(UsageError, match="fifo"):
        overlay.check(ov)
