"""`ota push`'s table: a STATE column an admin can act on, from the events a node prints.

The node's `ota apply --json` prints a phase event per component as its journal moves
(engine.follow), then a result event. The table used to show one bare journal phase:
the daemon's when it had one (so "committed" even when the base was staged too), a
push-internal step name ("apply") for a node that was already up to date, or a
component's "idle". Each case here is the event sequence of one real outcome.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spk_visor.errors import ExitCode
from spk_visor.ota import push


def _run(step: str, code: int, *events: dict[str, Any]) -> push.PushResult:
    outcome = push._Outcome(step)
    for doc in events:
        outcome.event(doc)
    outcome.ended()
    outcome.exit_code = code
    return outcome.result("node1", 1.0)


STARTED = {"event": "phase", "component": "op", "phase": "started", "pid": 42}


def test_daemon_swapped_and_base_staged_says_both() -> None:
    r = _run(
        push.STEP_APPLY,
        ExitCode.REBOOT_REQUIRED,
        STARTED,
        {"event": "phase", "component": "base", "phase": "writing", "slot": "b"},
        {"event": "phase", "component": "base", "phase": "staged", "slot": "b"},
        {"event": "phase", "component": "daemon", "phase": "staging", "version": "2.0.0"},
        {"event": "phase", "component": "daemon", "phase": "committed", "version": "2.0.0"},
        {"event": "result", "exit_code": 4, "changed": True, "version": "2.0.0"},
    )
    assert r.state == "daemon committed, base staged in slot b"
    assert r.phase == "committed"  # --json keeps its field


def test_up_to_date_node_is_not_shown_as_a_step_name() -> None:
    r = _run(
        push.STEP_APPLY,
        ExitCode.OK,
        {"event": "result", "exit_code": 0, "changed": False, "version": "2.0.0"},
    )
    assert r.state == "up to date"


def test_idle_carries_nothing() -> None:
    r = _run(
        push.STEP_APPLY,
        ExitCode.OK,
        STARTED,
        {"event": "phase", "component": "daemon", "phase": "idle"},
        {"event": "phase", "component": "base", "phase": "committed", "slot": "a"},
        {"event": "result", "exit_code": 0, "changed": True},
    )
    assert r.state == "base committed in slot a"
    assert "idle" not in push.summary_table([r])


def test_refused_before_any_change_and_lost_during_the_update() -> None:
    refused = _run(
        push.STEP_APPLY,
        ExitCode.REFUSED,
        {"event": "result", "exit_code": 3, "changed": False, "message": "signature"},
    )
    assert refused.state == "nothing changed"
    lost = _run(push.STEP_APPLY, ExitCode.TRANSIENT, STARTED)
    assert lost.state == "update started; run ota status on the node"


def test_table_has_a_state_column() -> None:
    rows = [
        _run(
            push.STEP_APPLY,
            ExitCode.ROLLED_BACK,
            STARTED,
            {"event": "phase", "component": "daemon", "phase": "rolled_back", "version": "1.0"},
            {"event": "result", "exit_code": 5, "changed": True},
        ),
        push.PushResult("node2", 8, push.SKIPPED, None, None, "not started", 0.0),
    ]
    lines = push.summary_table(rows).splitlines()
    assert lines[0].split()[:3] == ["NODE", "EXIT", "STATE"]
    assert "daemon rolled back" in lines[1]
    assert lines[2].split()[:4] == ["node2", "8", "not", "started"]


def test_attention_lines_name_each_node_that_needs_a_person() -> None:
    """What `ota push` prints on stderr: nothing for a success, a line for a staged base
    (reboot it), one per failure with what to do, and one for all the nodes not started."""
    ok = _run("apply", ExitCode.OK, STARTED, {"event": "result", "exit_code": 0})
    staged = _run(
        "apply",
        ExitCode.REBOOT_REQUIRED,
        STARTED,
        {"event": "phase", "component": "base", "phase": "staged", "slot": "b"},
    )
    busy = _run("apply", ExitCode.BUSY, {"event": "result", "exit_code": 6, "message": "locked"})
    skipped = [
        push.PushResult(n, 8, push.SKIPPED, None, None, f"{push.SKIPPED_PREFIX}{why}", 0.0)
        for n, why in (("n4", "stopped after n3 failed"), ("n5", "stopped after n3 failed; cut"))
    ]
    results = [
        ok,
        dataclasses.replace(staged, node="n2"),
        dataclasses.replace(busy, node="n3"),
        *skipped,
    ]
    assert push.attention_lines(results) == [
        "n2: base staged; reboot the node to use it (exit 4)",
        "n3: locked (exit 6); another OTA operation runs on the node; push again when it ends",
        "2 not started (n4, n5): stopped after n3 failed; fix that, push to them again",
    ]
    assert busy.hint is not None and ok.hint is None


def test_attention_lines_are_one_line_per_node_whatever_the_node_says() -> None:
    """A node's message or hint over several lines (or with a terminal escape) is shown on
    one line: -q promises cron one line per node."""
    failed = push.PushResult(
        "n1", 3, "apply", None, None, "refused:\nsecond line\x1b[2J", 0.0, hint="do\nthis"
    )
    lines = push.attention_lines([failed])
    assert len(lines) == 1 and "\n" not in lines[0] and "\x1b" not in lines[0], lines
    assert "second line" in lines[0] and "this" in lines[0], lines
