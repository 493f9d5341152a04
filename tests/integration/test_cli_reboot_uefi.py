"""`spk-visor reboot-uefi` asks before a destructive reboot: the question names every VM
the reboot ends, including VMMs that smechvisord did not start (it cannot shut those
down gracefully)."""

from __future__ import annotations

from tests.support.cli import TtyInput, run
from tests.support.daemon import Daemon, DaemonEnv
from tests.support.vmhelpers import foreign_vmm


def test_the_question_names_vmms_the_daemon_did_not_start(
    daemon: Daemon, daemon_env: DaemonEnv
) -> None:
    with foreign_vmm(daemon_env) as proc:
        r = run("--node", daemon.url, "--token", daemon.token, "reboot-uefi",
                stdin=TtyInput("n\n"))  # fmt: skip
    assert r.code == 3, r
    question = r.err.split("[y/N]")[0]
    # It used to say "no VM is running." while a hand-started VMM ran.
    assert "no VM is running." not in question, question
    assert f"pid-{proc.pid}" in question
    assert "not shut down" in question
    assert not [argv for argv in daemon_env.recorded() if argv[-1] == "reboot"]
