"""ota.bundle.check_is_bundle: the one place a path the user named is looked at before a
bundle is read (ota apply/verify/inspect -b, ota push, deploy send)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spk_visor.errors import UsageError
from spk_visor.ota.bundle import MAGIC, NOT_A_BUNDLE_HINT, check_is_bundle, missing_hint


def test_a_pipe_is_not_read_ahead() -> None:
    """`ota push -b <(...)`: the push's bundle came through a pipe, and the check read up
    to 1 MiB of it first, so the push got what was left. A pipe is its reader's to judge."""
    data = MAGIC + b"the rest of a bundle"
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        w = -1
        check_is_bundle(f"/proc/self/fd/{r}")
        assert os.read(r, 1 << 16) == data
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def test_a_fifo_with_no_writer_is_not_waited_for(tmp_path: Path) -> None:
    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    check_is_bundle(fifo)  # returns at once: opening it would wait for a writer


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "an empty file"),
        (b'{"signed": {}}', "a JSON document"),
        (b"-----BEGIN PRIVATE KEY-----\n", "a PEM key"),
        (b"root:x:0:0:root:/root:/bin/sh\n", "bundle magic"),
    ],
)
def test_a_file_that_is_not_a_bundle_says_what_it_is(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "wrong"
    path.write_bytes(content)
    with pytest.raises(UsageError) as e:
        check_is_bundle(path)
    assert f"{path} is not an OTA bundle: " in e.value.message and why in e.value.message
    assert e.value.hint == NOT_A_BUNDLE_HINT


def test_a_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        check_is_bundle(tmp_path)
    assert e.value.message == f"{tmp_path} is not an OTA bundle: it is a folder"


def test_a_bundle_and_a_missing_path_pass(tmp_path: Path) -> None:
    """A missing path is the opener's to name (with missing_hint)."""
    (tmp_path / "b.spkb").write_bytes(MAGIC + b"\0\0\0\2{}")
    check_is_bundle(tmp_path / "b.spkb")
    check_is_bundle(tmp_path / "missing.spkb")
    assert missing_hint(FileNotFoundError()) == "check the path; " + NOT_A_BUNDLE_HINT
    assert missing_hint(PermissionError()) is None
