"""The exit-code tables in docs/ name the codes the code can end with, no more, no fewer.

The code's side is read from the source (no run): every `ExitCode.NAME` a module (or one
function of it) names, and every SpkVisorError subclass it raises, through that class's
exit_code. 1 (a bug) is in no table, and 0 and 130 (interrupted, from the CLI's entry
point) need not be found in the module. A table that misses a code the command ends with
(deploy send's 8 for a target that takes no code attempt, before its table said so), or
names one it never does, fails here.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from spk_visor.errors import ExitCode, SpkVisorError

ROOT = Path(__file__).resolve().parents[2]
# Codes a table may name without the scanned code naming them: success, and Ctrl-C
# (cli.py turns KeyboardInterrupt into 130 for every command).
ANY_COMMAND = {int(ExitCode.OK), int(ExitCode.INTERRUPTED)}


def _codes(module: str, function: str | None = None) -> set[int]:
    """The exit codes `module` (or its top-level `function`) can end with."""
    mod = importlib.import_module(module)
    tree = ast.parse(Path(str(mod.__file__)).read_text())
    if function is not None:
        found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
        assert found, f"{module} has no function {function}"
        tree = found[0]  # type: ignore[assignment]
    codes: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "ExitCode"
        ):
            codes.add(int(ExitCode[node.attr]))
        elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            cls = getattr(mod, name, None) if name else None
            if isinstance(cls, type) and issubclass(cls, SpkVisorError):
                codes.add(int(cls.exit_code))
    return codes - {int(ExitCode.INTERNAL)}


def _table(page: str, heading: str, column: int = 0) -> set[int]:
    """The codes in `column` of the table under `heading` in docs/`page` (a cell may
    name several: "2, 6, 7, 9", "0 (77 with `--unchanged-exit-77`)")."""
    text = (ROOT / "docs" / page).read_text()
    start = text.index(heading)
    codes: set[int] = set()
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            cell = line.strip("|").split("|")[column]
            codes.update(int(n) for n in re.findall(r"\b\d+\b", cell))
    assert codes, f"no exit-code table under {heading!r} in docs/{page}"
    return codes


# What a node's OTA command runs through (the pull and apply paths), and the CLI's end of it.
OTA_MODULES = ("pull", "engine", "swap", "slots", "journal", "roots", "fetch", "store", "bundle")
OTA_NODE = [
    *((f"spk_visor.ota.{m}", None) for m in OTA_MODULES),
    *((f"spk_visor.trust.{m}", None) for m in ("verify", "dsse", "roots")),
    ("spk_visor.commands.ota", "_node"),
    ("spk_visor.commands.ota", "_outcome"),
]

CASES = {
    "ota (node)": (("ota.md", "### Exit codes", 0), OTA_NODE),
    "ota pull -q": (("ota-cli.md", "## Pulling from cron", 1), OTA_NODE),
    "deploy send": (
        ("deploy.md", "## Exit codes of `deploy send`", 0),
        [("spk_visor.deploy.donor", None), ("spk_visor.commands.deploy", "send")],
    ),
    "deploy receive": (
        ("deploy.md", "## Exit codes of `deploy receive`", 0),
        [("spk_visor.commands.deploy", "receive"), ("spk_visor.ota.roots", None)],
    ),
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_exit_table_matches_the_code(command: str) -> None:
    (page, heading, column), sources = CASES[command]
    documented = _table(page, heading, column)
    possible = set().union(*(_codes(m, f) for m, f in sources))
    missing = possible - documented
    extra = documented - possible - ANY_COMMAND
    assert not missing, f"docs/{page}: {command} can exit {sorted(missing)}, its table omits it"
    assert not extra, f"docs/{page}: {command}'s table names {sorted(extra)}, never returned"


def test_the_scan_sees_raises_and_codes() -> None:
    # The scanner itself: a raised UsageError counts as 2, a named ExitCode as itself.
    assert int(ExitCode.USAGE) in _codes("spk_visor.commands.deploy", "receive")
    assert int(ExitCode.NOT_ELIGIBLE) in _codes("spk_visor.deploy.donor")
    assert int(ExitCode.REFUSED) in _codes("spk_visor.ota.roots")
