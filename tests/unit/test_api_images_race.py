"""GET /api/images while images come and go: a file removed between the folder listing and
its stat is left out of the answer; it used to fail the whole request with a 500."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from smechvisord import api


def test_an_image_removed_during_the_listing_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gone.img").write_bytes(b"x" * 512)
    (tmp_path / "kept.img").write_bytes(b"y" * 1024)
    real_scandir = os.scandir

    def scandir_then_remove(path: Any) -> Any:
        # The listing sees both files; one is deleted before the API looks at its size.
        entries = list(real_scandir(path))
        for e in entries:
            e.is_file(follow_symlinks=True)  # cache the type, as a listing taken earlier
        (tmp_path / "gone.img").unlink()
        return iter(entries)

    monkeypatch.setattr(os, "scandir", scandir_then_remove)
    a = object.__new__(api.Api)
    a.settings = SimpleNamespace(image_dirs=[tmp_path])  # type: ignore[assignment]
    a.vms = SimpleNamespace(list_all=lambda: [])  # type: ignore[assignment]
    status, found = a.images(None)  # type: ignore[arg-type]
    assert status == 200
    assert [(i["name"], i["size_bytes"]) for i in found] == [("kept.img", 1024)]
