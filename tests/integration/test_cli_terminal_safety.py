"""What a node sends that reaches the operator's terminal through human output: a disk
image whose file name holds escape sequences is shown, never acted on."""

from __future__ import annotations

from tests.support.cli import run
from tests.support.daemon import Daemon, DaemonEnv

# Reset the terminal (ESC c), ring the bell, and reorder what follows (bidi override).
# The daemon refuses , " [ ] and = in a disk path (the VMM's option syntax), not these.
NAME = "disk\x1bc\x07\u202eimg.raw"


def test_a_disk_name_with_escape_sequences_is_shown_escaped(
    daemon: Daemon, daemon_env: DaemonEnv
) -> None:
    disk = daemon_env.make_image(NAME)
    node = ("--node", daemon.url, "--token", daemon.token)
    created = run(*node, "vm", "create", "-c", "1", "-m", "512M", "-d", str(disk), "--name", "esc")
    assert created.code == 0, created
    for argv in (("vm", "list"), ("vm", "show", "esc")):
        r = run(*node, *argv)
        assert r.code == 0, r
        assert "\x1b" not in r.out and "\x07" not in r.out and "\u202e" not in r.out, r.out
        assert "disk\\x1bc\\x07\\u202eimg.raw" in r.out
    for text in (created.out, created.err):
        assert "\x1b" not in text, text
    stopped = run(*node, "vm", "stop", "esc")
    assert stopped.code == 0, stopped
    # The confirmation question names the disk too.
    refused = run(*node, "vm", "delete", "esc")
    assert refused.code == 3 and "\x1b" not in refused.err, refused
