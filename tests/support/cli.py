"""Run `spk-visor` in-process and capture what it prints (EXAMPLES.md G.29).

The standard streams are swapped for the call (the CLI's Console, typer's usage errors
and the confirmation prompt all use them), and the environment is cleaned of the
SPK_VISOR_* settings of whoever runs the tests, so a developer's own config file, token
or node never leak into a test.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

from spk_visor.cli import main

# No config file unless a test names one.
NO_CONFIG = "/nonexistent/spk-visor/config.toml"
# Nor pinned TLS certificates: a test that pins names its own file.
NO_KNOWN_CERTS = "/nonexistent/spk-visor/known_certs"


class Result(NamedTuple):
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


class TtyInput(io.StringIO):
    """Typed answers, on what the CLI takes for a terminal."""

    def isatty(self) -> bool:
        return True


@contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("SPK_VISOR_")]:
            del os.environ[key]
        os.environ["SPK_VISOR_CONFIG"] = NO_CONFIG
        os.environ["SPK_VISOR_KNOWN_CERTS"] = NO_KNOWN_CERTS
        os.environ.update(env or {})
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run(
    *argv: str,
    env: Mapping[str, str] | None = None,
    stdin: str | io.StringIO | None = None,
) -> Result:
    """`spk-visor ARGV...` in this process: (exit code, stdout, stderr). `stdin` is a
    non-terminal input unless given as a TtyInput."""
    out, err = io.StringIO(), io.StringIO()
    inp = stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin or "")
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = inp, out, err
    try:
        with _environment(env):
            code = main(list(argv))
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    return Result(code, out.getvalue(), err.getvalue())


def run_json(*argv: str, env: Mapping[str, str] | None = None) -> object:
    """`spk-visor --json ARGV...`, which must succeed; its parsed stdout."""
    result = run("--json", *argv, env=env)
    assert result.code == 0, result
    return json.loads(result.out)
