"""bench.writer_ab's variant spec: what a variant sets is what its stages run with."""

from __future__ import annotations

import pytest

from bench import writer_ab
from spk_visor.install import image as image_writer

MIB = 1 << 20


def test_variants_parse_with_units_and_flush_only_at_the_end() -> None:
    got = writer_ab.parse("a:SYNC_BYTES=64M,WINDOWS=8; b:SYNC_BYTES=0;c:CHUNK=512K;")
    assert got == {
        "a": {"SYNC_BYTES": 64 * MIB, "WINDOWS": 8},
        # 0 means one flush, at the end: no count of checked bytes ever reaches it.
        "b": {"SYNC_BYTES": writer_ab.NEVER},
        "c": {"CHUNK": 512 << 10},
    }
    assert writer_ab.NEVER > 1 << 50
    for settings in got.values():
        for key in settings:
            assert isinstance(getattr(image_writer, key), int)


@pytest.mark.parametrize("spec", ["a:SYNC_BYTE=64M", "a:REFUSED_HINT=1", "", " ; "])
def test_a_setting_that_is_not_an_integer_constant_fails_the_bench(spec: str) -> None:
    # A typo would otherwise measure the default twice under two names.
    with pytest.raises(SystemExit):
        writer_ab.parse(spec)
