"""`spk-visor node` over HTTP imports neither paramiko nor cryptography: together they cost
about 0.2 s of start-up, most of the 0.3 s the issue allows (bench/cli.py measures it).
spk_visor/transport/__init__.py imports the SSH transport only when a target needs it.

Each check runs in a fresh interpreter, since this one has imported everything already.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("paramiko", "cryptography")

PROBE = """
import json, sys
from spk_visor.cli import main
code = main(sys.argv[1:])
loaded = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"code": code, "loaded": loaded, "modules": sorted(sys.modules)}))
"""


def run_cli(tmp_path: Path, *argv: str, probe: str = PROBE, **env_extra: str) -> dict[str, Any]:
    # No configuration of the developer's may steer the run: no config file, no
    # SPK_VISOR_* variables (but those in env_extra), an empty home (SSH config, known_hosts).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_VISOR_")}
    env.update(
        HOME=str(tmp_path),
        SPK_VISOR_CONFIG=str(tmp_path / "none.toml"),
        XDG_CONFIG_HOME=str(tmp_path),
        **env_extra,
    )
    env.pop("SSH_AUTH_SOCK", None)
    proc = subprocess.run(
        [sys.executable, "-c", probe, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,  # -c puts the cwd first on sys.path: this checkout's spk_visor
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    result["stdout"] = proc.stdout
    return result


def test_node_over_http_imports_neither_paramiko_nor_cryptography(tmp_path: Path) -> None:
    # Port 1 on loopback refuses the connection: the whole HTTP path runs, quickly.
    result = run_cli(tmp_path, "--node", "http://127.0.0.1:1", "--token", "x", "node")
    assert result["code"] == 7, result["stderr"]  # TRANSIENT: it really tried to connect
    assert "connection refused" in result["stderr"]
    assert "spk_visor.transport.http" in result["modules"]  # the HTTP transport was used
    assert [m for m in HEAVY if m in result["loaded"]] == []


def test_node_over_http_does_not_import_requests(tmp_path: Path) -> None:
    """requests and urllib3 cost ~70 ms of start-up (issue 10): the daemon's API is spoken
    with the standard library's http.client."""
    result = run_cli(tmp_path, "--node", "http://127.0.0.1:1", "--token", "x", "node")
    assert result["code"] == 7, result["stderr"]
    assert "spk_visor.transport.http" in result["modules"]
    assert [m for m in ("requests", "urllib3") if m in result["loaded"]] == []
    # An address is connected to without getaddrinfo, which loads the "idna" codec.
    assert "encodings.idna" not in result["modules"]


def test_node_over_http_does_not_import_pydantic(tmp_path: Path) -> None:
    """Typer 0.29 would import it to coerce the global options (~0.2 s); typer_fast keeps
    it for values only Typer's own coercion can judge."""
    result = run_cli(tmp_path, "--node", "http://127.0.0.1:1", "--token", "x", "node")
    assert result["code"] == 7, result["stderr"]
    assert "pydantic" not in result["loaded"]


def need_ssh_transport() -> None:
    if importlib.util.find_spec("spk_visor.transport.ssh") is None:
        pytest.skip("spk_visor/transport/ssh.py does not exist yet: nothing to compare with")


def test_control_the_ssh_transport_imports_paramiko() -> None:
    """The probe above could pass by never looking: here the same probe sees paramiko."""
    need_ssh_transport()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, spk_visor.transport.ssh; print('paramiko' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "True"


def test_control_node_over_ssh_imports_paramiko(tmp_path: Path) -> None:
    """Opening an SSH transport, even one whose connection is refused, loads paramiko."""
    need_ssh_transport()
    result = run_cli(tmp_path, "--ssh", "nobody@127.0.0.1:1", "--token", "x", "node")
    assert result["code"] != 0
    assert "paramiko" in result["loaded"], result["stderr"]


# What only other commands use: their command modules, the OTA and deploy libraries and
# the third-party packages behind them.
NOT_FOR_NODE = (
    "spk_visor.commands.ota",
    "spk_visor.commands.deploy",
    "spk_visor.commands.vm",
    "spk_visor.commands.pci",
    "spk_visor.ota",
    "spk_visor.deploy",
    "spk_visor.install",
    "spk_visor.trust",
    "spk_visor.progress",
    "tqdm",
    "zstandard",
    "spake2",
)


def test_node_loads_only_the_node_command(tmp_path: Path) -> None:
    """Start-up time: the command that runs is the only command module imported."""
    result = run_cli(tmp_path, "--node", "http://127.0.0.1:1", "--token", "x", "node")
    assert result["code"] == 7, result["stderr"]
    assert "spk_visor.commands.node" in result["modules"]
    loaded = [m for m in NOT_FOR_NODE if m in result["modules"]]
    assert loaded == []


def test_control_ota_loads_its_own_module(tmp_path: Path) -> None:
    """The probe sees a lazily loaded command module when that command runs."""
    result = run_cli(tmp_path, "ota", "--help")
    assert result["code"] == 0, result["stderr"]
    assert "spk_visor.commands.ota" in result["modules"]
    assert "spk_visor.commands.deploy" not in result["modules"]
