"""Ctrl-C (a real SIGINT to a real process) while the CLI waits on a node: exit 130, and
under --json the same error document on stdout as every other failure."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv", [["vm", "list"], ["node"]])
def test_ctrl_c_under_json_prints_the_error_document(argv: list[str]) -> None:
    with socket.socket() as silent:  # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        silent.settimeout(60)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spk_visor",
                "--json",
                "--node",
                url,
                "--token",
                "t" * 16,
                "--timeout",
                "60",
                *argv,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            conn, _ = silent.accept()  # the CLI is now waiting for an answer
            with conn:
                conn.settimeout(30)
                assert conn.recv(65536).startswith(b"GET ")  # the request was sent
                time.sleep(0.3)
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "Traceback" not in err, err
    assert "interrupted" in err, err
    doc = json.loads(out)
    assert doc["error"]["exit_code"] == 130, doc
    assert doc["error"]["reason"] == "interrupted", doc
