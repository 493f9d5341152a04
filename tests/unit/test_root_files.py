"""Every command reads a root file through ota/roots.py: the same problem gets the same
error, exit code and words from `deploy receive --trust-root`, the shim build, `ota
verify --root` and the node's trust store."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spk_visor.commands import deploy as deploy_cmd
from spk_visor.deploy import shim_iso
from spk_visor.errors import ExitCode, SpkVisorError
from spk_visor.ota import roots as ota_roots
from tests.support.ota_pki import Pki


def _tamper(raw: bytes) -> bytes:
    """One bit of the first signature: still a root document, no longer signed."""
    out = bytearray(raw)
    at = out.index(b'"sig"') + 10
    out[at] = ord("A") if out[at] != ord("A") else ord("B")
    return bytes(out)


LOADERS: dict[str, Callable[[Path], Any]] = {
    "deploy receive": deploy_cmd._load_root,
    "shim build": shim_iso._load_trust_root,
    "trust store": lambda p: ota_roots.TrustStore(p, p.parent / "no-trust-dir").load(),
}


@pytest.fixture(scope="module")
def good_raw() -> bytes:
    return Pki().root_env().to_bytes()


@pytest.mark.parametrize("who", sorted(LOADERS))
def test_the_same_words_for_each_problem(who: str, tmp_path: Path, good_raw: bytes) -> None:
    files = {
        "junk": (b"{", ExitCode.USAGE, "is not a root document"),
        "key": (b"ed25519 abcd\n", ExitCode.USAGE, "is not a root document"),
        "tampered": (_tamper(good_raw), ExitCode.REFUSED, "refused"),
    }
    for name, (raw, code, words) in files.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(raw)
        with pytest.raises(SpkVisorError) as caught:
            LOADERS[who](path)
        assert caught.value.exit_code == code, (name, caught.value)
        assert words in caught.value.message and str(path) in caught.value.message, (
            name,
            caught.value.message,
        )
        assert caught.value.message == _message_of(path), name
    good = tmp_path / "good.json"
    good.write_bytes(good_raw)
    assert LOADERS[who](good)


def _message_of(path: Path) -> str:
    with pytest.raises(SpkVisorError) as caught:
        ota_roots.load_file(path)
    return caught.value.message


def test_an_unreadable_root_file_is_a_configuration_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        path = tmp_path / "a-folder"
        path.mkdir()  # reading a folder fails for root too
    else:
        path = tmp_path / "root.json"
        path.write_bytes(b"{}")
        path.chmod(0)
    for who in ("deploy receive", "shim build"):
        with pytest.raises(SpkVisorError) as caught:
            LOADERS[who](path)
        assert caught.value.exit_code == ExitCode.USAGE, who
        assert caught.value.message.startswith(f"cannot read the trust root {path}"), who
        assert caught.value.hint, who
