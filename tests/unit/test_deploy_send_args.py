"""`deploy send` checks what the operator typed before any file is read or any target
contacted: a wrong --target, --discovery-port or --epoch is a usage error (exit 2) that
names the option, never an internal error or a "transient" failure to connect (exit 7)."""

from __future__ import annotations

import pytest

from spk_visor.errors import ExitCode
from tests.support import cli

CODE = "42-K7QX9"
MISSING = "/nonexistent/spk.spkb"  # read only after the options were checked


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--target", "[::1"], "--target"),
        (["--target", "256.1.1.1:5"], "--target"),
        (["--target", ":5"], "--target"),
        (["--target", "10.0.0.5:0"], "--target"),
        (["--target", "10.0.0.5:70000"], "--target"),
        (["--target", "node1.example:47475"], "--target"),
        (["--discovery-port", "70000"], "--discovery-port"),
        (["--discovery-port", "0"], "--discovery-port"),
        (["--epoch", "-1"], "--epoch"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], named: str) -> None:
    res = cli.run("deploy", "send", CODE, "--bundle", MISSING, *args)
    assert res.code == ExitCode.USAGE, res
    assert "internal error" not in res.err
    assert named in res.err, res.err
    assert MISSING not in res.err, "the bundle was opened before the options were checked"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5", ("10.0.0.5", 47475)),
        ("10.0.0.5:9", ("10.0.0.5", 9)),
        ("[fe80::1]:9", ("fe80::1", 9)),
        ("fe80::1", ("fe80::1", 47475)),
    ],
)
def test_good_targets(text: str, expected: tuple[str, int]) -> None:
    from spk_visor.deploy.donor import parse_target  # noqa: PLC0415

    assert parse_target(text) == expected


@pytest.mark.parametrize("args", [["--port", "70000"], ["--discovery-port", "70000"]])
def test_receive_ports_out_of_range_are_usage_errors(args: list[str]) -> None:
    """As root, `deploy receive --port 70000` reached bind(): OverflowError, exit 1."""
    res = cli.run("deploy", "receive", *args)
    assert res.code == ExitCode.USAGE, res
    assert args[0] in res.err and "internal error" not in res.err, res.err
