"""smechvisord imports only the standard library: import every module in a fresh
interpreter (where the CLI's third-party packages are installed) and look at what loaded."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import smechvisord

PROBE = """
import importlib, json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def daemon_modules() -> list[str]:
    root = Path(smechvisord.__file__).parent
    names = ["smechvisord"]
    # __main__ runs the daemon when imported; it only imports smechvisord.main.
    names += [
        f"smechvisord.{m.name}" for m in pkgutil.iter_modules([str(root)]) if m.name != "__main__"
    ]
    return names


def test_every_daemon_module_is_found() -> None:
    names = daemon_modules()
    for expected in (
        "smechvisord.server",
        "smechvisord.vms",
        "smechvisord.host",
        "smechvisord.main",
        "smechvisord.protocol",
    ):
        assert expected in names


def test_daemon_loads_no_third_party_module() -> None:
    out = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, *daemon_modules()],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    )
    loaded = json.loads(out.stdout)
    assert "smechvisord.server" in loaded  # the probe really imported the daemon
    allowed = set(sys.stdlib_module_names) | {"smechvisord"}
    foreign = sorted({m.split(".")[0] for m in loaded} - allowed)
    assert foreign == []


def test_probe_would_catch_a_third_party_import() -> None:
    out = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, "requests"], capture_output=True, text=True, check=True
    )
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert loaded - set(sys.stdlib_module_names)
