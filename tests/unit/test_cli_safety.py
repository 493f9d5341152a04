"""The CLI's safety net, in-process with the network switched off: tokens never reach the
screen (messages, --verbose tracebacks), a bug is one line unless --verbose, flags beat
the environment, and a closed stdout is not an error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spk_visor import config, connection
from spk_visor.client import Client
from spk_visor.config import Settings, Target
from spk_visor.errors import ConfigError, TransportError
from spk_visor.transport.http import HttpTransport
from tests.support.cli import NO_CONFIG, run

ROOT = Path(__file__).resolve().parents[2]
SECRET = "0123456789abcdef-SECRET"
NODE = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kw: Any) -> None:
        raise AssertionError("a unit test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---- tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [f"{SECRET}\nX", f"{SECRET} X", f"{SECRET}\x01", f"{SECRET}€"])
def test_an_unusable_token_is_a_usage_error_that_does_not_show_it(bad: str) -> None:
    # requests refuses such a header with an error quoting it ("... header value:
    # 'Bearer <token>'"): that used to be printed, with exit 7 (as if the node were down).
    r = run("--node", NODE, "--token", bad, "node")
    assert r.code == 2, r
    assert SECRET not in r.out + r.err
    assert r.err_lines == [
        "spk-visor: error: the API token from --token is not a token: it holds spaces, "
        "control or non-ASCII characters",
        "copy it again from /etc/smechvisord/token on the node",
    ]


def test_an_unusable_token_from_the_environment_names_it() -> None:
    r = run("-v", "--node", NODE, "node", env={"SPK_VISOR_TOKEN": f"{SECRET}\r\nX-Evil: 1"})
    assert r.code == 2, r
    assert SECRET not in r.out + r.err
    assert r.err_lines[-2] == (
        "spk-visor: error: the API token from SPK_VISOR_TOKEN is not a token: it holds "
        "spaces, control or non-ASCII characters"
    )


def test_an_unusable_token_file_names_it(tmp_path: Path) -> None:
    token = tmp_path / "alpha.token"
    token.write_text(f"{SECRET} junk\n")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[nodes.alpha]\nurl = "{NODE}"\ntoken_file = "{token}"\n')
    r = run("--node", "alpha", "node", env={"SPK_VISOR_CONFIG": str(cfg)})
    assert r.code == 2, r
    assert SECRET not in r.out + r.err
    assert r.err_lines[0] == (
        f"spk-visor: error: the API token from token file {token} is not a token: it holds "
        "spaces, control or non-ASCII characters"
    )


def test_a_token_quoted_by_a_failing_library_is_redacted_even_under_verbose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def quoting(self: HttpTransport, *_a: Any, **_kw: Any) -> None:
        # What http.client says about a header it refuses.
        raise ValueError(f"Invalid header value b'Bearer {SECRET}\\r\\n'")

    monkeypatch.setattr(HttpTransport, "_request", quoting)
    r = run("-v", "--node", NODE, "--token", SECRET, "node")
    assert r.code == 7, r
    assert "Traceback" in r.err  # --verbose shows it...
    assert SECRET not in r.out + r.err  # ...with the token redacted, in every link
    assert r.err_lines[-1] == (
        f"spk-visor: error: {NODE}: ValueError: Invalid header value b'<redacted>\\r\\n'"
    )


# ---- bugs --------------------------------------------------------------------------------


def _buggy_node(self: Client) -> None:
    raise KeyError("cpu_model")


def test_a_bug_is_one_line_and_exit_1_without_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Client, "node", _buggy_node)
    r = run("--node", NODE, "--token", SECRET, "node")
    assert r.code == 1, r
    assert r.out == ""
    assert r.err_lines == [
        "spk-visor: internal error: KeyError: 'cpu_model'",
        "re-run with --verbose for the traceback",
    ]


def test_a_bug_shows_its_traceback_under_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Client, "node", _buggy_node)
    r = run("--verbose", "--node", NODE, "--token", SECRET, "node")
    assert r.code == 1, r
    assert r.err_lines[0] == "Traceback (most recent call last):"
    assert r.err_lines[-1] == "spk-visor: internal error: KeyError: 'cpu_model'"
    # --verbose of one run does not leak into the next (main() may run many times).
    monkeypatch.setattr(Client, "node", _buggy_node)
    assert "Traceback" not in run("--node", NODE, "--token", SECRET, "node").err


# ---- flag > env > file > default -------------------------------------------------------


@pytest.fixture
def rack(tmp_path: Path) -> dict[str, str]:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[nodes.alpha]\nurl = "http://alpha.invalid:8080"\n\n'
        '[nodes.beta]\nurl = "http://beta.invalid:8080"\n\n'
        '[groups]\nrack = ["alpha", "beta"]\n'
    )
    return {"SPK_VISOR_CONFIG": str(cfg)}


def test_a_target_flag_beats_an_exported_target_variable(
    rack: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(target: Target, settings: Settings) -> Client:
        raise TransportError(f"tried {target.name}")

    monkeypatch.setattr(connection, "connect", unreachable)
    # SPK_VISOR_NODE is someone's everyday default; --fleet on the command line wins.
    r = run("--fleet", "rack", "node", env={**rack, "SPK_VISOR_NODE": "alpha"})
    assert r.code == 7, r
    assert [line.split()[:3] for line in r.out.splitlines()[1:]] == [
        ["alpha", "error:", "tried"],
        ["beta", "error:", "tried"],
    ]
    env = {**rack, "SPK_VISOR_FLEET": "rack", "SPK_VISOR_SSH": "gamma"}
    assert config.resolve(**_no_flags(), node="beta", environ=env).targets[0].name == "beta"


def _no_flags() -> dict[str, Any]:
    return {
        "ssh": None,
        "fleet": None,
        "token": None,
        "timeout": None,
        "accept_new": False,
    }


def test_two_target_variables_are_refused(rack: dict[str, str]) -> None:
    r = run("node", env={**rack, "SPK_VISOR_NODE": "alpha", "SPK_VISOR_FLEET": "rack"})
    assert r.code == 2
    assert r.err_lines == [
        "spk-visor: error: set only one of SPK_VISOR_NODE, SPK_VISOR_SSH and SPK_VISOR_FLEET",
        "or name the target with --node, --ssh or --fleet",
    ]


@pytest.mark.parametrize(
    ("argv", "env", "line"),
    [
        (["--timeout", "0"], {}, "--timeout 0: must be a positive number of seconds"),
        # --timeout inf is refused while parsing (test_cli_parsing.py's nan/inf test).
        ([], {"SPK_VISOR_TIMEOUT": "inf"}, "SPK_VISOR_TIMEOUT inf: must be a positive number"),
        ([], {"SPK_VISOR_TIMEOUT": "nan"}, "SPK_VISOR_TIMEOUT nan: must be a positive number"),
        ([], {"SPK_VISOR_TIMEOUT": "0"}, "SPK_VISOR_TIMEOUT 0: must be a positive number of "),
        # It reached the socket layer: "OverflowError: timestamp out of range", exit 7.
        (
            ["--timeout", "99999999999"],
            {},
            "--timeout 1e+11: must be a positive number of seconds, at most 86400",
        ),
        ([], {"SPK_VISOR_TIMEOUT": "1e11"}, "SPK_VISOR_TIMEOUT 1e+11: must be a positive"),
    ],
)
def test_a_zero_timeout_is_refused_not_replaced_by_the_default(
    argv: list[str], env: dict[str, str], line: str
) -> None:
    r = run(*argv, "--node", NODE, "--token", SECRET, "node", env=env)
    assert r.code == 2, r
    assert r.err_lines[0].startswith(f"spk-visor: error: {line}")


def test_check_token_strips_blanks_around_a_token() -> None:
    assert config.check_token(f" {SECRET}\n", "x") == SECRET
    with pytest.raises(ConfigError) as info:
        config.check_token(f"{SECRET} {SECRET}", "the file")
    assert SECRET not in str(info.value.diagnostics())


# ---- closed stdout -----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["about"], ["--version"], ["--help"]])
def test_a_closed_stdout_is_not_an_error(argv: list[str]) -> None:
    """`spk-visor ... | head -1`: the reader left; exit 0 (not 1, "internal error"), with
    nothing on stderr."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "spk_visor", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            env={**os.environ, "SPK_VISOR_CONFIG": NO_CONFIG},
            cwd=ROOT,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr.decode()) == (0, "")
