"""When cloud-hypervisor fails to start a VM, `spk-visor vm create` shows why: the VMM's
last output lines (the daemon's details.stderr_tail). It printed "...while starting; see
stderr_tail" and dropped the tail, and the failed create leaves no VM to look at."""

from __future__ import annotations

import json

from tests.support.cli import run
from tests.support.daemon import Daemon, DaemonEnv

FAULT = "injected firmware fault"


def test_a_failed_boot_shows_the_vmms_own_words(daemon_env: DaemonEnv) -> None:
    daemon_env.extra_env["CH_STANDIN_BOOT_FAIL"] = FAULT
    d = Daemon(daemon_env)
    try:
        argv = ["vm", "create", "-c", "1", "-m", "512M", "-d", str(daemon_env.disk)]
        node = ["--node", d.url, "--token", d.token]
        r = run(*node, *argv)
        assert r.code == 9, r  # operator needed: the node, not spk-visor, failed
        assert "stderr_tail" not in r.err
        assert r.err_lines[0].startswith(
            f"spk-visor: error: {d.url}: cloud-hypervisor exited with code 1 while starting: "
        ), r.err
        assert FAULT in r.err_lines[0]
        assert "VMM output (last lines):" in r.err_lines
        assert any(FAULT in line and line.startswith("  ") for line in r.err_lines[2:])
        # --json: the same words in the error document.
        r = run(*node, "--json", *argv)
        assert r.code == 9
        assert FAULT in json.loads(r.out)["error"]["message"]
    finally:
        d.stop()
