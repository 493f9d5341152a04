"""The runner of the docs' runnable blocks finds exactly the marked blocks, and a failing
command in one is a failure (tests/support/readme.py)."""

from __future__ import annotations

from pathlib import Path

from tests.support import readme

PAGE = """\
# Title

```sh
not-run --at-all
```

```sh runnable
echo one
```

text

```sh runnable
echo two > made
false
echo never
```
"""


def test_only_marked_blocks_are_runnable(tmp_path: Path) -> None:
    page = tmp_path / "PAGE.md"
    page.write_text(PAGE)
    blocks = readme.runnable_blocks(page)
    assert [(b.line, b.text) for b in blocks] == [
        (7, "echo one\n"),
        (13, "echo two > made\nfalse\necho never\n"),
    ]


def test_a_failing_command_fails_its_block(tmp_path: Path) -> None:
    page = tmp_path / "PAGE.md"
    page.write_text(PAGE)
    box = readme.Sandbox(tmp_path, readme.sandbox_env(tmp_path, tmp_path), 0, tmp_path / "log")
    first, second = (box.run(b) for b in readme.runnable_blocks(page))
    assert first.returncode == 0 and first.stdout == "one\n"
    assert second.returncode != 0
    assert "never" not in second.stdout, "sh -e stops at the first failing command"
    assert (tmp_path / "made").read_text() == "two\n"
    report = readme.failure(readme.runnable_blocks(page)[1], second)
    assert report.startswith("PAGE.md:13: a runnable block failed (exit 1)")
