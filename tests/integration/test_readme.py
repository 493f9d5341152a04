"""The README's commands, and the operator docs', run as written (tests/support/readme.py).

Every ```sh runnable block of a page runs, in order, in a sandbox: a copy of the checkout,
a temporary HOME, and `make run` already serving on a free port. A block that fails fails
the suite, with the page and line of the block.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import readme
from tests.support.prereq import need_command

PAGES = [readme.REPO / "README.md", *sorted((readme.REPO / "docs").glob("*.md"))]
RUNNABLE = [p for p in PAGES if readme.runnable_blocks(p)]


def test_the_readme_has_runnable_blocks() -> None:
    # The quickstart after `make run` and the OTA walk-through at least.
    assert len(readme.runnable_blocks(readme.REPO / "README.md")) >= 2


@pytest.mark.parametrize(
    "page", RUNNABLE, ids=[p.relative_to(readme.REPO).as_posix() for p in RUNNABLE]
)
def test_runnable_blocks(page: Path) -> None:
    need_command("make", "make")
    need_command("git", "git")
    with readme.sandbox() as box:
        for block in readme.runnable_blocks(page):
            result = box.run(block)
            if result.returncode != 0:
                pytest.fail(
                    readme.failure(block, result)
                    + f"--- make run's log\n{box.daemon_log.read_text()}"
                )
