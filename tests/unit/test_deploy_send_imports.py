"""`spk-visor deploy send` loads only what a send uses: the donor's start-up is part of
every deploy's wall time (bench/deploy.py splits it out as `donor_startup_s`).

Each probe runs the real command in a fresh interpreter against a listener on loopback
that accepts and hangs up, so the whole path up to the handshake runs (argument parsing,
the bundle, the channel module) and the command exits 7 (transient: it did connect).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.ota import build
from tests.support.ota_pki import Pki, tiny_tree
from tests.unit.test_cli_imports import PROBE, run_cli


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("send-imports")
    result = build.build(
        out=work / "release.spkb",
        version="1.0.0",
        counter=1,
        keys=Pki().release,
        daemon_tree=tiny_tree(work / "tree", "1.0.0"),
    )
    return result.bundle


@pytest.fixture
def hang_up() -> Iterator[tuple[int, list[float]]]:
    """A loopback port that accepts connections and closes them at once."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[float] = []

    def serve() -> None:
        try:
            while True:
                conn, _ = listener.accept()
                accepted.append(1.0)
                conn.close()
        except OSError:
            return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1]), accepted
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        listener.close()
        thread.join(timeout=10)


def probe(tmp_path: Path, *argv: str, **env_extra: str) -> dict[str, Any]:
    """`spk-visor ARGV` in a fresh interpreter: its exit code, JSON report and modules."""
    result = run_cli(tmp_path, *argv, **env_extra)
    lines = result["stdout"].strip().splitlines()
    result["report"] = json.loads("\n".join(lines[:-1]) or "null")
    return result


def run_send(tmp_path: Path, bundle: Path, port: int) -> dict[str, Any]:
    return probe(
        tmp_path,
        *("deploy", "send", "--json", "--bundle", str(bundle), "--target", f"127.0.0.1:{port}"),
        *("--disk", "loop:disk.img", "--confirm-wipe", "loop:disk.img", "42-K7QX9"),
    )


def test_send_really_reaches_the_handshake(
    tmp_path: Path, bundle: Path, hang_up: tuple[int, list[float]]
) -> None:
    """The control for the probes below: the send connected and ran the channel code."""
    port, accepted = hang_up
    result = run_send(tmp_path, bundle, port)
    assert result["code"] == 7, result
    assert result["report"][0]["phase"] == "handshake", result["report"]
    assert accepted
    assert "spk_visor.deploy.channel" in result["modules"]
    assert "spake2" in result["modules"]


def test_send_does_not_import_pydantic(
    tmp_path: Path, bundle: Path, hang_up: tuple[int, list[float]]
) -> None:
    """Typer 0.29 coerces list and Path parameters (CODE..., --bundle, --target, --disk)
    through pydantic, ~0.1 s of every deploy; typer_fast settles them itself."""
    port, _ = hang_up
    result = run_send(tmp_path, bundle, port)
    assert result["code"] == 7, result
    assert [m for m in result["modules"] if m.split(".")[0] in ("pydantic", "pydantic_core")] == []


# With --bundle and --target: the node's OTA store (journal, store, nodeconf), the trust
# verifier and the key code (the target verifies, the donor only parses the envelope),
# discovery (--target skips it) and the progress bars (--json) are not used.
NOT_FOR_A_BUNDLE_SEND = (
    "spk_visor.trust.keys",
    "spk_visor.ota.store",
    "spk_visor.ota.journal",
    "spk_visor.ota.nodeconf",
    "spk_visor.trust.verify",
    "spk_visor.trust.roots",
    "spk_visor.deploy.discovery",
    "spk_visor.deploy.install",
    "spk_visor.deploy.receiver",
    "tqdm",
    "zstandard",
    "requests",
)


def test_send_with_bundle_and_target_loads_only_what_it_uses(
    tmp_path: Path, bundle: Path, hang_up: tuple[int, list[float]]
) -> None:
    port, _ = hang_up
    result = run_send(tmp_path, bundle, port)
    assert result["code"] == 7, result
    assert [m for m in NOT_FOR_A_BUNDLE_SEND if m in result["modules"]] == []


def test_control_send_from_the_node_store_loads_the_store(
    tmp_path: Path, hang_up: tuple[int, list[float]]
) -> None:
    """Without --bundle the donor reads this node's OTA store: the probe sees it load."""
    port, _ = hang_up
    result = probe(
        tmp_path,
        *("deploy", "send", "--json", "--target", f"127.0.0.1:{port}", "42-K7QX9"),
        SPK_VISOR_OTA_SYSROOT=str(tmp_path),
    )
    assert result["code"] == 2, result  # nothing installed under that sysroot: usage error
    assert "spk_visor.ota.journal" in result["modules"]


# Registered before the CLI runs, so it runs after the CLI's own exit handlers (LIFO).
AT_EXIT = """
import atexit, gc, sys
atexit.register(lambda: print(f"frozen at exit: {gc.get_freeze_count()}", file=sys.stderr))
"""


def test_send_skips_the_final_garbage_collection(
    tmp_path: Path, bundle: Path, hang_up: tuple[int, list[float]]
) -> None:
    """At exit the objects the imports made are frozen: the interpreter's final
    collection (15-20 ms of every deploy) does not walk them. Only at exit: a process
    that runs the command and goes on (the tests') is left as it was."""
    port, _ = hang_up
    probe = (
        AT_EXIT + PROBE + "print(f'frozen after main: {gc.get_freeze_count()}', file=sys.stderr)"
    )
    result = run_cli(
        tmp_path,
        *("deploy", "send", "--json", "--bundle", str(bundle), "--target", f"127.0.0.1:{port}"),
        *("--disk", "loop:disk.img", "--confirm-wipe", "loop:disk.img", "42-K7QX9"),
        probe=probe,
    )
    assert result["code"] == 7, result
    assert "frozen after main: 0" in result["stderr"]
    at_exit = result["stderr"].rsplit("frozen at exit: ", 1)[1].split()[0]
    assert int(at_exit) > 10_000, result["stderr"]
