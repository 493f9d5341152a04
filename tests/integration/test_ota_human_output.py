"""`ota status`, `ota check` and `ota inspect` for people: absent values and booleans in
words (never Python's None/False/[]), a layout to read rather than a JSON dump, and every
line within the terminal's width (COLUMNS), long values wrapped or cut with an ellipsis.
--json keeps the documents as they were."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spk_visor.ota import bundle
from tests.support import cli
from tests.support.ota_pki import Node, Pki, make_bundle, signed_manifest, tiny_tree

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
PYTHON_WORDS = re.compile(r"\b(None|True|False)\b|\[\]|\{\}")


def human(node: Node | None, *argv: str, columns: int = 60) -> str:
    env = {**(node.env if node else {}), "COLUMNS": str(columns)}
    res = cli.run(*argv, env=env)
    assert res.code == 0, res
    text = res.out
    assert not PYTHON_WORDS.search(text), text
    for line in text.splitlines():
        assert len(line) <= columns, (len(line), line)
    return text


def test_status_of_a_fresh_node_in_words(ota_node: Node) -> None:
    text = human(ota_node, "ota", "status")
    assert "current" in text and "none" in text.lower(), text
    assert "floor" in text


def test_status_follow_with_nothing_running_reports_no_empty_phases(ota_node: Node) -> None:
    """--follow on an idle node has no phase to report: not a bare "base: " on stderr,
    nor phase events without a phase under --json."""
    res = cli.run("ota", "status", "--follow", env=ota_node.env)
    assert res.code == 0, res
    assert res.err == "", res.err
    res = cli.run("--json", "ota", "status", "--follow", env=ota_node.env)
    assert res.code == 0, res
    assert '"event": "phase"' not in res.out, res.out
    assert "installed" in json.loads(res.out), res.out


def test_status_of_an_updated_node(ota_node: Node) -> None:
    ota_node.ctx().installed.record(
        "daemon", {"release": "0.2.0-abcdef12", "version": "0.2.0"}, "ab" * 32, 2, "0.2.0"
    )
    ota_node.paths.releases.mkdir(parents=True)
    (ota_node.paths.releases / "0.2.0-abcdef12").mkdir()
    ota_node.paths.current.symlink_to("releases/0.2.0-abcdef12")
    text = human(ota_node, "ota", "status", columns=48)
    assert "0.2.0" in text and "counter 2" in text, text
    assert "0.2.0-abcdef12" in text


def test_check_in_words(tmp_path: Path, ota_pki: Pki, ota_node: Node) -> None:
    built = make_bundle(tmp_path, ota_pki)
    text = human(ota_node, "ota", "check", "--bundle", str(built.bundle), columns=50)
    assert "all checks passed" in text
    assert re.search(r"downgrade:?\s+no\b", text), text
    assert re.search(r"notes:?\s+none\b", text), text
    assert "0.2.0" in text
    doc = json.loads(
        cli.run(
            "--json", "ota", "check", "--bundle", str(built.bundle), env=ota_node.env
        ).out.splitlines()[-1]
    )
    assert doc["downgrade"] is False and doc["notes"] == []


def test_inspect_is_a_summary_not_json(tmp_path: Path, ota_pki: Pki) -> None:
    built = make_bundle(tmp_path, ota_pki)
    text = human(None, "ota", "inspect", str(built.bundle), columns=60)
    assert "NOT VERIFIED" in text
    assert not any(line.lstrip().startswith(("{", '"')) for line in text.splitlines()), text
    assert "0.2.0" in text and "counter 2" in text and "smechvisord" in text, text
    shown = json.loads(cli.run("ota", "inspect", "--json", str(built.bundle)).out)
    assert shown["verified"] is False and shown["manifest"]["release"]["version"] == "0.2.0"


def test_inspect_keeps_hostile_text_on_its_line(tmp_path: Path, ota_pki: Pki) -> None:
    """The manifest is NOT verified: its strings may hold terminal escapes, newlines and
    whole paragraphs; they are shown escaped, cut to the width."""
    tree = tiny_tree(tmp_path / "tree", "0.2.0")
    good = make_bundle(tmp_path, ota_pki, tree=tree).payload
    payload = json.loads(json.dumps(good))
    payload["release"]["version"] = "0.2.0\x1b[2J\nFAKE: verified " + "x" * 300
    payload["product"] = 12  # wrong types do not crash the summary
    payload["components"]["smechvisord"]["tree"]["files"] = "nonsense"
    env = signed_manifest(payload, ota_pki.release)
    out = tmp_path / "hostile.spkb"
    with out.open("wb") as f:
        bundle.write(f, env, [], [])
    text = human(None, "ota", "inspect", str(out), columns=70)
    assert "\x1b" not in text and "\nFAKE" not in text, text
    assert "…" in text


def test_history_in_words(ota_node: Node) -> None:
    """A fresh node printed a bare header row, and events without a version or exit code
    left blank cells: say that there is no history, and absent values in words."""
    text = human(ota_node, "ota", "history")
    assert "no OTA history" in text and "TIME" not in text, text
    ota_node.ctx().history.append("base.discarded", slot="b", manifest="cd" * 32)
    text = human(ota_node, "ota", "history", columns=100)
    row = next(line for line in text.splitlines() if "base.discarded" in line)
    assert row.split()[2:] == ["cdcdcdcdcdcd", "none", "none", "none"], row
    assert json.loads(cli.run("--json", "ota", "history", env=ota_node.env).out)[0]["slot"] == "b"
