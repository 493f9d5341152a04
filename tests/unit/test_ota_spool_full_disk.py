"""A temporary folder that fills up on the last buffered bytes of a spooled bundle (the
flush after the copy) is the user's to fix, like one that fills up mid-copy: exit 2 with
the hint to save the bundle to a file or set TMPDIR, not an internal error."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from spk_visor.errors import ExitCode, UsageError
from spk_visor.ota import bundle, spool


class FullOnFlush(io.BytesIO):
    """A temporary file whose writes are buffered and whose flush finds the disk full."""

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_on_the_final_flush_is_a_usage_error(tmp_path: Path) -> None:
    source = tmp_path / "bundle.spkb"
    source.write_bytes(bundle.MAGIC + b"\0" * 4096)
    with pytest.raises(UsageError) as caught:
        spool._copy(str(source), FullOnFlush())
    assert caught.value.exit_code == ExitCode.USAGE
    assert "No space left on device" in caught.value.message
    assert caught.value.hint == spool.SPOOL_HINT
