"""`spk-visor ota status` in words: what an operator needs to act on, without --json."""

from __future__ import annotations

from spk_visor.ota.report import status_text
from tests.support.cli import run


def test_a_failed_trial_says_which_check_failed_and_what_it_said() -> None:
    """A trial boot that failed its health checks: the text names each failing check and
    its output, not only "health checks failed" (the journal has them: `failures`)."""
    doc = {
        "installed": {"version": "2.0.0", "counter": 2},
        "base": {
            "phase": "trial_failed",
            "slot": "a",
            "version": "3.0.0",
            "reason": "health checks failed",
            "failures": [
                "required/90-raid: exit 1: the RAID controller is missing",
                "required/95-nic: timed out after 60 s",
            ],
        },
        "booted_slot": "b",
    }
    text = " ".join(status_text(doc).split())
    assert "health checks failed" in text
    assert "required/90-raid: exit 1: the RAID controller is missing" in text
    assert "required/95-nic: timed out after 60 s" in text
    assert "booted slot: b" in text


def test_status_text_escapes_what_a_check_printed() -> None:
    doc = {"base": {"phase": "trial_failed", "failures": ["required/x: exit 1: \x1b[31mred"]}}
    text = status_text(doc)
    assert "\x1b" not in text
    assert "required/x: exit 1:" in text


def test_node_side_commands_refuse_a_remote_node() -> None:
    """`spk-visor --ssh root@node ota status` would print THIS machine's OTA state as if it
    were the node's: refused (exit 2), saying how to reach the node; nothing is read."""
    for argv in (
        ("--ssh", "root@node.invalid", "ota", "status"),
        ("--ssh", "root@node.invalid", "ota", "history"),
        ("--node", "https://node.invalid:8080", "ota", "status", "--json"),
        ("--ssh", "root@node.invalid", "ota", "commit"),
    ):
        result = run(*argv)
        assert result.code == 2, (argv, result)
        assert "acts on the machine it runs on" in result.err, result.err
        assert "ssh root@NODE spk-visor ota" in result.err
