"""The human table (spk_visor.output.table): fits the width it is given, says absent
values in words, and prints a reason shared by several rows once."""

from __future__ import annotations

import io
import json

import pytest

from spk_visor.output import Column, Console, Noted, fit_lines, table, terminal_width

COLUMNS = [
    Column("name"),
    Column("model", fit="cut"),
    Column("note", absent="none", fit="wrap"),
    Column("ok"),
]
SHARED = "the same long reason every row has"
ROWS: list[list[object]] = [
    ["alpha", "Intel(R) Xeon(R) Silver 4309Y CPU @ 2.80GHz", "a sentence long enough to wrap",
     Noted("no", [SHARED])],
    ["beta", "AMD", None, Noted("no", [SHARED, "its own"])],
    ["gamma", None, "", Noted("yes")],
]  # fmt: skip


def test_without_a_width_lines_stay_whole() -> None:
    lines = table(COLUMNS, ROWS).splitlines()
    assert lines[0].split() == ["NAME", "MODEL", "NOTE", "OK"]
    assert "Intel(R) Xeon(R) Silver 4309Y CPU @ 2.80GHz" in lines[1]
    assert lines[1].endswith("no [1]") and lines[2].endswith("no [1,2]")
    assert lines[3].split() == ["gamma", "-", "yes"]  # "" stays blank, None is its word
    assert "none" in lines[2]
    assert lines[4:] == ["[1] the same long reason every row has", "[2] its own"]


@pytest.mark.parametrize("width", [40, 50, 60, 80])
def test_every_line_fits_the_width(width: int) -> None:
    text = table(COLUMNS, ROWS, width)
    assert max(len(line) for line in text.splitlines()) <= width, text
    # Wrapped, nothing is lost; cut, the cell ends in an ellipsis.
    assert {"a", "sentence", "long", "enough", "to", "wrap"} <= set(text.split())
    assert "\u2026" in text.splitlines()[1]
    assert text.count("the same long reason") == 1


def test_columns_that_keep_their_width_win_over_the_terminal() -> None:
    text = table([Column("address")], [["0000:00:14.0"]], 5)
    assert text.splitlines()[1] == "0000:00:14.0"


def test_fit_lines_wraps_after_the_marker() -> None:
    text = "  - IOMMU groups are empty: enable VT-d / AMD-Vi in firmware setup"
    assert fit_lines(text, 40).splitlines() == [
        "  - IOMMU groups are empty: enable VT-d",
        "    / AMD-Vi in firmware setup",
    ]
    assert fit_lines(text, None) == text


def test_the_width_is_columns_else_the_terminal_else_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "72")
    assert terminal_width(io.StringIO()) == 72
    monkeypatch.setenv("COLUMNS", "wide")
    assert terminal_width(io.StringIO()) is None  # a pipe or a file: no limit
    monkeypatch.delenv("COLUMNS")
    assert terminal_width(io.StringIO()) is None


def test_the_push_summary_says_absent_values_in_words() -> None:
    """`ota push` printed "-" for the version and downtime of a node that was never
    reached; docs/cli.md: a missing value is said in words, never "-"."""
    from spk_visor.ota.push import PushResult, summary_table  # noqa: PLC0415

    skipped = PushResult("s2", 8, "skipped", None, None, "not started: the canary failed", 0.0)
    row = summary_table([skipped]).splitlines()[1].split()
    assert row[:7] == ["s2", "8", "not", "started", "none", "n/a", "0.0"], row
    assert "-" not in row, row


# A node's strings (a disk path, a PCI name, an error message) reach the operator's
# terminal: an escape sequence in one must not act on it (clear the screen, set the
# window title, write the clipboard with OSC 52, hide text with a bidi override).
HOSTILE = "disk\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\r\u202egpj.img\x9b31m"


def test_human_output_shows_control_characters_instead_of_sending_them() -> None:
    out, err = io.StringIO(), io.StringIO()
    console = Console(out, err, io.StringIO())
    console.print(f"line one\n\t{HOSTILE}")
    console.error(f"spk-visor: error: {HOSTILE}")
    console.table([Column("disk", fit="wrap")], [[HOSTILE]])
    assert console.prompt(f"Delete {HOSTILE}? ") == ""
    for text in (out.getvalue(), err.getvalue()):
        assert not any(c in text for c in "\x1b\x07\r\u202e\x9b"), repr(text)
        assert "\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[2J\\r\\u202egpj.img\\x9b31m" in text
    assert out.getvalue().startswith("line one\n\tdisk")  # newlines and tabs are text


def test_json_and_raw_console_output_are_left_alone() -> None:
    out = io.StringIO()
    console = Console(out, io.StringIO())
    console.write("\x1b[1mlogin:\x1b[0m ")  # a guest's serial console is a terminal stream
    console.json({"disk": HOSTILE})
    assert out.getvalue().startswith("\x1b[1mlogin:\x1b[0m ")
    assert json.loads(out.getvalue().split(" ", 1)[1]) == {"disk": HOSTILE}


def test_a_wrapping_column_breaks_between_words_not_inside_them() -> None:
    # At 40 or 60 columns `pci` printed "VGA comp" / "atible c" / "ontrolle" / "r": the
    # column went down to 8 characters even though the table could not fit anyway.
    cols = [Column("address"), Column("class", fit="wrap"), Column("driver", fit="wrap")]
    rows = [["0000:41:00.0", "VGA compatible controller", "snd_hda_intel"]]
    lines = table(cols, rows, 30).splitlines()
    assert [line.split() for line in lines[1:]] == [
        ["0000:41:00.0", "VGA", "snd_hda_intel"],
        ["compatible"],
        ["controller"],
    ]
    # A very long "word" (a path) still wraps inside itself, from 16 characters on.
    path = "/var/lib/smechvisord/vms/a-rather-long-image-name.img"
    lines = table([Column("id"), Column("disk", fit="wrap")], [["web-1", path]], 30).splitlines()
    assert max(len(line) for line in lines) <= 30
    assert "".join(line[7:].strip() for line in lines[1:]) == path
