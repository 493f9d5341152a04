"""The journal's one transition table: every write is checked, a forbidden change writes
nothing, and every phase the code names is a phase of the table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spk_visor.ota import journal
from spk_visor.ota.journal import BasePhase, DaemonPhase, Journal, TransitionError
from spk_visor.ota.nodeconf import NodePaths

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def jr(tmp_path: Path) -> Journal:
    return Journal(NodePaths(tmp_path))


def test_a_forbidden_transition_is_refused_and_writes_nothing(jr: Journal) -> None:
    jr.begin("base", BasePhase.INVALIDATING, slot="b")
    before = jr.paths.journal.read_bytes()
    # Straight to staged would skip the write and the read-back.
    with pytest.raises(TransitionError, match=r"invalidating.*staged"):
        jr.set("base", BasePhase.STAGED)
    assert jr.paths.journal.read_bytes() == before
    jr.set("base", BasePhase.WRITING)
    jr.set("base", BasePhase.WRITING, more="fields")  # the same phase again is fine
    assert jr.phase("base") == "writing"


def test_unknown_phases_and_components_are_refused(jr: Journal) -> None:
    with pytest.raises(TransitionError, match="not a phase"):
        jr.set("base", "fetching")  # never written by anything: gone from the model
    with pytest.raises(TransitionError, match="no component"):
        jr.set("kernel", "idle")


def test_a_whole_daemon_update_and_a_whole_base_trial_follow_the_table(jr: Journal) -> None:
    for phase in ("staging", "preflight", "switching", "probation", "committed"):
        _ = jr.set("daemon", phase) if phase != "staging" else jr.begin("daemon", phase)
    for phase in ("invalidating", "writing", "verifying", "staged", "trial", "committed"):
        _ = jr.set("base", phase) if phase != "invalidating" else jr.begin("base", phase)
    assert jr.phase("daemon") == "committed" and jr.phase("base") == "committed"
    # A new update starts from idle again.
    jr.begin("base", BasePhase.INVALIDATING)


def test_the_table_is_closed() -> None:
    for table in journal.TRANSITIONS.values():
        for targets in table.values():
            assert targets <= set(table), targets


def test_every_phase_the_ota_code_writes_is_in_the_table() -> None:
    """The literal phases slots.py and swap.py journal (`_set(ctx, "x"` / `_phase(ctx, "x"`)
    all exist, so none of them can only fail at run time."""
    written: dict[str, set[str]] = {"base": set(), "daemon": set()}
    for name, component in (("slots.py", "base"), ("swap.py", "daemon")):
        text = (ROOT / "spk_visor" / "ota" / name).read_text()
        written[component] |= set(re.findall(r'_(?:set|phase)\(\s*ctx,\s*"([a-z_]+)"', text))
        written[component] |= set(re.findall(r'"failed" if .* else "([a-z_]+)"', text))
    assert written["base"] and written["daemon"]
    assert written["base"] <= {p.value for p in BasePhase}
    assert written["daemon"] <= {p.value for p in DaemonPhase}
