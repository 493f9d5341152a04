"""The README and docs/ stay true to the code: the daemon's settings table lists every
setting with its real default, and every relative link points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smechvisord import settings

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_settings_table_matches_the_code() -> None:
    text = (ROOT / "README.md").read_text()
    rows = {
        cells[0]: cells
        for line in text.splitlines()
        if line.startswith("| SMECHVISORD_")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == {s.env for s in settings.SETTINGS}, "README's settings table drifted"
    for s in settings.SETTINGS:
        _env, flag, default = rows[s.env][:3]
        assert flag == s.flag, s.env
        if s.default:
            assert default == s.default, f"{s.env}: README says {default}, the code {s.default}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files: {broken}"
