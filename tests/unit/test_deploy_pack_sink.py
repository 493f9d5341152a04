"""The daemon pack's sink checks what arrives with trust.verify.BlobCheck, as OTA does:
never more than the signed size, and at the end that size and the signed hash; only
then is the pack renamed and unpacked."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from spk_visor.deploy.install import InstallError, _PackSink

PACK = b"the daemon's files, concatenated" * 100


class _Inst(SimpleNamespace):
    def __init__(self, mountpoint: Path) -> None:
        super().__init__(mountpoint=mountpoint, durable_bytes=0, unpacked=[])

    def emit_progress(self) -> None:
        pass

    def unpack(self, pack: Path, daemon: Any) -> None:
        self.unpacked.append(pack.read_bytes())


def _sink(tmp_path: Path, data: bytes = PACK) -> tuple[_Inst, _PackSink]:
    inst = _Inst(tmp_path)
    daemon = SimpleNamespace(pack=f"sha256:{hashlib.sha256(data).hexdigest()}")
    return inst, _PackSink(inst, daemon, len(data))  # type: ignore[arg-type]


def test_the_signed_pack_is_unpacked(tmp_path: Path) -> None:
    inst, sink = _sink(tmp_path)
    for i in range(0, len(PACK), 1000):
        sink.write(memoryview(PACK)[i : i + 1000])
    sink.finish()
    assert inst.unpacked == [PACK] and inst.durable_bytes == len(PACK)


def test_more_than_the_signed_size_is_refused_before_it_is_written(tmp_path: Path) -> None:
    _inst, sink = _sink(tmp_path)
    sink.write(PACK)
    with pytest.raises(InstallError) as caught:
        sink.write(b"x")
    assert caught.value.reason == "too_many_bytes"
    assert sink.part.read_bytes() == PACK
    sink.close()
    assert not sink.part.exists()


@pytest.mark.parametrize("bad", [PACK[:-1], PACK[:-1] + b"!"])
def test_a_short_or_altered_pack_is_not_unpacked(tmp_path: Path, bad: bytes) -> None:
    inst, sink = _sink(tmp_path)
    sink.write(bad)
    with pytest.raises(InstallError) as caught:
        sink.finish()
    assert caught.value.reason == "blob_hash", caught.value
    assert inst.unpacked == [] and not sink.final.exists()
    sink.close()
    assert not sink.part.exists()
