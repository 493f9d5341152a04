"""`spk-visor --ssh n1 --ssh n2 ota push BUNDLE` went to n2 alone and said nothing: a
second --ssh (or --node, --fleet) silently replaced the first, and an admin who meant two
nodes saw one node's table and exit 0. It is a usage error now, naming the option and the
way to reach several nodes (--fleet)."""

from __future__ import annotations

import pytest

from spk_visor.errors import ExitCode
from tests.support import cli


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--ssh", "root@127.0.0.1:1", "--ssh", "root@127.0.0.1:2", "ota", "push", "b"], "--ssh"),
        (["--node", "a", "-n", "b", "node"], "--node"),
        (["-n", "a", "-nb", "node"], "--node"),
        (["-fg1", "-f", "g2", "node"], "--fleet"),
        (["--fleet=rack1", "--fleet", "rack2", "node"], "--fleet"),
        (["-q", "--ssh", "x", "--ssh=y", "node"], "--ssh"),
    ],
)
def test_a_target_option_given_twice_is_a_usage_error(argv: list[str], option: str) -> None:
    res = cli.run(*argv)
    assert res.code == ExitCode.USAGE, res
    assert f"{option} is given twice" in res.err, res.err
    assert "--fleet" in res.err and "internal error" not in res.err, res.err
    assert res.out == "", res.out


def test_an_option_value_that_looks_like_the_option_is_not_a_repeat() -> None:
    """`--token --ssh` is a token, not a second --ssh: the command's -h runs."""
    res = cli.run("--ssh", "root@127.0.0.1:1", "--token", "--ssh", "ota", "push", "-h")
    assert res.code == ExitCode.OK, res
    assert "given twice" not in res.err and "Usage" in res.out, res


@pytest.mark.parametrize("help_option", ["--help", "-h"])
def test_help_wins_over_a_repeated_target(help_option: str) -> None:
    res = cli.run("--ssh", "a", "--ssh", "b", help_option)
    assert res.code == ExitCode.OK, res
    assert "given twice" not in res.err and "Usage" in res.out, res
