"""The detached OTA worker starts wherever spk-visor runs from.

On a node, /usr/bin/spk-visor is `python3 -IB` with its library directory put on
sys.path by the launcher (image/nodefiles.CLI_LAUNCHER), not by site-packages. The worker
is a new interpreter: it must find spk_visor and its dependencies the same way, or every
`ota apply --detach` (so every push) starts a worker that dies at its first import.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

import spk_visor
from spk_visor.errors import OperatorNeededError
from spk_visor.ota import engine
from tests.support.ota_pki import Pki, make_bundle, make_node

CHECKOUT = Path(spk_visor.__file__).resolve().parents[1]


def test_worker_imports_under_an_isolated_launcher(tmp_path: Path) -> None:
    system_python = shutil.which("python3", path="/usr/bin")
    if system_python is None:
        pytest.skip("no /usr/bin/python3")
    # As the image's launcher: an isolated interpreter, the library inserted by hand.
    lib = [str(CHECKOUT), *site.getsitepackages()]
    code = (
        "import sys, subprocess\n"
        f"sys.path[:0] = {lib!r}\n"
        "from spk_visor.ota import engine\n"
        "argv, env = engine.worker_command('ab' * 32, 9, [])\n"
        "run = subprocess.run([*argv, '--help'], env=env, capture_output=True, text=True)\n"
        "sys.stderr.write(run.stderr)\n"
        "print(run.stdout)\n"
        "raise SystemExit(run.returncode)\n"
    )
    run = subprocess.run(
        [system_python, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "spk-visor-ota-worker" in run.stdout
    assert sys.version_info[:2] == (3, 11) or "ModuleNotFoundError" not in run.stderr


def test_detached_apply_fails_when_the_worker_dies_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`apply --detach` (what `ota push` runs) waits for the worker's journal entry: a
    worker that dies first is an error, never a silent success followed by `status --wait`
    reporting the previous operation."""
    pki = Pki()
    node = make_node(tmp_path, pki)
    result = make_bundle(tmp_path, pki, version="1.0.0", counter=1)
    monkeypatch.setenv("SPK_VISOR_OTA_SYSROOT", str(node.sysroot))

    def dying(
        manifest_hex: str, lock_fd: int, flags: list[str]
    ) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-c", "raise SystemExit(1)"], {}

    monkeypatch.setattr(engine, "worker_command", dying)
    ctx = node.ctx()
    with result.bundle.open("rb") as f, pytest.raises(OperatorNeededError, match="exited"):
        engine.apply_stream(ctx, f, engine.ApplyOptions(detach=True))
    assert ctx.journal.get(engine.OP).get("manifest") != result.manifest_sha256
