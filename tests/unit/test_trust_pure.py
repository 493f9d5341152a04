"""spk_visor.trust is pure: bytes and a reference time in, verdicts out.

Three ways of holding it to that: what its modules import (read from their source), what
importing them loads in a fresh interpreter, and a whole verification run (keys, roots
and their rotation, manifest, channel, blobs) with files, the clock and the environment
made to raise. And expiry is decided by the reference time the caller passes, to the
second, whatever the machine's clock says.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import datetime as dt
import io
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

import spk_visor.trust
from spk_visor.errors import VerificationError
from spk_visor.trust import dsse, keys, roots, verify
from tests.support.trust_world import AGENT, NODE, REF, World, release

TRUST_DIR = Path(spk_visor.trust.__file__).parent
# What a trust module may import: pure standard-library modules, cryptography, and the
# two pure helpers of spk_visor (its error types, the strict JSON parser).
ALLOWED_IMPORTS = {
    "__future__",
    "base64",
    "binascii",
    "collections.abc",
    "dataclasses",
    "datetime",
    "hashlib",
    "json",
    "posixpath",
    "re",
    "typing",
    "spk_visor",
    "spk_visor.errors",
    "spk_visor.strict_json",
}
# Calls that read the clock, the environment or files, whatever module they come from.
FORBIDDEN_CALLS = {"open", "now", "utcnow", "today", "getenv", "time", "monotonic", "urandom"}


def _imports_and_calls(source: str) -> tuple[set[str], set[str]]:
    tree = ast.parse(source)
    imports: set[str] = set()
    calls: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imports.add(node.module or "")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            calls.add(name)
        elif isinstance(node, ast.Attribute) and node.attr == "environ":
            calls.add("environ")
    return imports, calls


def _not_allowed(imports: set[str]) -> set[str]:
    return {
        name
        for name in imports
        if name not in ALLOWED_IMPORTS
        and not name.startswith(("cryptography.", "spk_visor.trust"))
        and name != "cryptography"
    }


def _trust_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(TRUST_DIR.glob("*.py"))}


def test_trust_modules_import_nothing_that_reaches_files_the_clock_or_the_environment() -> None:
    sources = _trust_sources()
    assert {"keys.py", "dsse.py", "roots.py", "manifest.py", "verify.py"} <= set(sources)
    for name, source in sources.items():
        imports, calls = _imports_and_calls(source)
        assert _not_allowed(imports) == set(), name
        assert calls & (FORBIDDEN_CALLS | {"environ"}) == set(), name


def test_the_source_check_would_catch_file_clock_and_environment_access() -> None:
    imports, calls = _imports_and_calls(
        "import os\nimport time\nfrom pathlib import Path\nimport requests\n"
        "x = open('f')\nt = dt.datetime.now(dt.UTC)\ny = os.environ['A']\n"
    )
    assert _not_allowed(imports) == {"os", "time", "pathlib", "requests"}
    assert {"open", "now", "environ"} <= calls


# Imports cryptography's modules first (what they load is theirs), then the trust package.
PROBE = """
import importlib, json, sys
crypto, trust = json.loads(sys.argv[1])
for name in crypto:
    try:
        importlib.import_module(name)  # a submodule imported by name (`from m import x`)
    except ImportError:
        importlib.import_module(name.rpartition(".")[0])
before = set(sys.modules)
for name in trust:
    importlib.import_module(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_importing_trust_loads_no_third_party_module_but_cryptography() -> None:
    modules = [f"spk_visor.trust.{p.stem}" for p in TRUST_DIR.glob("*.py") if p.stem != "__init__"]
    crypto = set()  # each `from cryptography.m import x` as m.x: x may be a submodule
    for source in _trust_sources().values():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cryptography"):
                crypto |= {f"{node.module}.{alias.name}" for alias in node.names}
    assert crypto
    out = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, json.dumps([sorted(crypto), modules])],
        capture_output=True,
        text=True,
        check=True,
        cwd=TRUST_DIR,
    )
    loaded = json.loads(out.stdout)
    assert "spk_visor.trust.verify" in loaded  # the probe really imported the package
    allowed = set(sys.stdlib_module_names) | {"spk_visor", "smechvisord"}
    assert sorted({m.split(".")[0] for m in loaded} - allowed) == []
    # Nothing of the OTA or deploy layers (files, state) comes along.
    assert [m for m in loaded if m.startswith(("spk_visor.ota", "spk_visor.deploy"))] == []


def _refuse(what: str) -> Any:
    def refused(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise AssertionError(f"spk_visor.trust called {what}")

    return refused


@contextlib.contextmanager
def no_files_no_clock() -> Iterator[None]:
    """Every way to a file, the clock or the environment raises inside the block (only
    there: pytest itself needs them around it)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _forbid(monkeypatch)
        yield


def _forbid(monkeypatch: pytest.MonkeyPatch) -> None:
    for owner, name in (
        (builtins, "open"),
        (io, "open"),
        (io, "open_code"),
        (os, "open"),
        (os, "stat"),
        (os, "lstat"),
        (os, "listdir"),
        (os, "scandir"),
        (os, "getenv"),
        (os, "urandom"),
        (pathlib.Path, "open"),
        (pathlib.Path, "read_bytes"),
        (pathlib.Path, "read_text"),
        (pathlib.Path, "stat"),
        (time, "time"),
        (time, "time_ns"),
        (time, "monotonic"),
        (time, "localtime"),
        (time, "gmtime"),
    ):
        monkeypatch.setattr(owner, name, _refuse(f"{owner.__name__}.{name}"))
    monkeypatch.setattr(os, "environ", {})


def _whole_verification(world: World) -> str:
    """Keys, a root and its rotation, a channel, a manifest and its blob, all verified."""
    key = keys.generate()
    pem = key.to_pem(b"secret")
    assert keys.parse_signing_key(pem, b"secret", "key").keyid == key.keyid
    public = json.dumps(keys.public_doc(key.public)).encode()
    assert keys.parse_public_key(public, "key.pub") == key.public

    root = roots.load_anchor(world.root_env().to_bytes(), "root v1")
    world.root_keys = [*world.root_keys, key]
    v2_raw = world.root_env(2).to_bytes()
    root = roots.verify_next(root, v2_raw)
    assert roots.newest_anchor([(world.root_env(1).to_bytes(), "v1"), (v2_raw, "v2")])
    roots.check_expiry(root, REF)

    payload, pack = release({"bin/smechvisord": b"#!/bin/sh\n", "lib/a.py": b"x = 1\n"})
    menv = world.manifest_env(payload)
    menv = dsse.from_bytes(menv.to_bytes(), dsse.MANIFEST_TYPE)
    channel, unchanged = verify.verify_channel(
        dsse.from_bytes(world.channel_env(menv).to_bytes(), dsse.CHANNEL_TYPE),
        root,
        name="stable",
        start=REF,
        stored=None,
    )
    assert not unchanged
    verified = verify.verify_manifest(
        menv, root, start=REF, node=NODE, agent_version=AGENT, channel=channel
    )
    verify.check_counter(
        verified,
        floor=0,
        installed=0,
        mode="pull",
        allow_downgrade=False,
        allow_channel_revert=True,
    )
    for blob_id, size in verified.manifest.blobs.items():
        check = verify.BlobCheck(blob_id, size)
        check.update(memoryview(pack))
        check.finish()
    return verified.sha256


def test_a_whole_verification_runs_with_files_clock_and_environment_forbidden() -> None:
    world = World()
    with no_files_no_clock():
        digest = _whole_verification(world)
    assert len(digest) == 64


def test_the_purity_guard_really_forbids_files_and_the_clock(tmp_path: Path) -> None:
    with no_files_no_clock():
        with pytest.raises(AssertionError, match=r"builtins\.open"):
            open(tmp_path / "x", "wb")  # noqa: SIM115
        with pytest.raises(AssertionError, match="read_bytes"):
            (tmp_path / "x").read_bytes()
        with pytest.raises(AssertionError, match=r"time\.time"):
            time.time()
        assert "HOME" not in os.environ
    assert time.time() > 0


# -- expiry at a reference time ----------------------------------------------------------


def test_expiry_is_decided_by_the_reference_time_to_the_second() -> None:
    world = World(root_expires=REF + dt.timedelta(hours=1))
    root = world.root()
    second = dt.timedelta(seconds=1)
    roots.check_expiry(root, REF + dt.timedelta(hours=1) - second)
    with pytest.raises(VerificationError, match="expired at 2030-06-01T13:00:00Z"):
        roots.check_expiry(root, REF + dt.timedelta(hours=1))
    # The machine's clock (years before REF) plays no part: the same documents are
    # refused at a reference time after expiry and accepted before it.
    payload, _pack = release({"bin/smechvisord": b"x"})
    menv = world.manifest_env(payload)
    kwargs: dict[str, Any] = {"node": NODE, "agent_version": AGENT}
    assert verify.verify_manifest(menv, root, start=REF, **kwargs).sha256 == menv.payload_sha256
    with pytest.raises(VerificationError, match=r"trusted root .* expired"):
        verify.verify_manifest(menv, root, start=REF + dt.timedelta(hours=2), **kwargs)
    # A channel expires on its own date, before the root does.
    cenv = world.channel_env(menv, expires=REF + dt.timedelta(minutes=30))
    chan = {"name": "stable", "stored": None}
    verify.verify_channel(cenv, root, start=REF + dt.timedelta(minutes=29), **chan)  # type: ignore[arg-type]
    with pytest.raises(VerificationError, match="channel stable expired at 2030-06-01T12:30:00Z"):
        verify.verify_channel(cenv, root, start=REF + dt.timedelta(minutes=30), **chan)  # type: ignore[arg-type]


def test_a_root_rotation_is_checked_against_the_reference_time_only_at_use() -> None:
    """An expired root can still hand over to its successor (rotation is how an expired
    root is replaced); it is the newest root that must not have expired at use."""
    world = World(root_expires=REF - dt.timedelta(days=1))
    v1 = world.root()
    world.root_expires = REF + dt.timedelta(days=365)
    v2 = roots.verify_next(v1, world.root_env(2).to_bytes())
    with pytest.raises(VerificationError, match="expired"):
        roots.check_expiry(v1, REF)
    roots.check_expiry(v2, REF)
