"""A CLI stopped by SIGTERM or SIGHUP exits 128 + the signal, says so on stderr, and
under --json its error document gives that same status, even when stderr is a terminal
that has gone away (the write fails with EIO after a hangup)."""

from __future__ import annotations

import errno
import io
import json
import signal
from collections.abc import Callable

import pytest

from spk_visor import cli


class GoneTerminal(io.StringIO):
    """stderr after a hangup: every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")


def stopped_by(signum: int) -> Callable[[], None]:
    def build() -> None:
        raise cli._Signalled(signum)

    return build


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_the_json_document_gives_the_exit_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signum: int
) -> None:
    monkeypatch.setattr(cli, "build", stopped_by(signum))
    status = cli.main(["--json", "node"])
    out, err = capsys.readouterr()
    assert status == 128 + signum
    document = json.loads(out)
    assert document["error"]["exit_code"] == 128 + signum
    assert document["error"]["reason"] == "interrupted"
    assert err.strip() == f"spk-visor: {signal.Signals(signum).name}"


def test_a_hangup_with_the_terminal_gone_still_exits_129(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "build", stopped_by(signal.SIGHUP))
    monkeypatch.setattr("sys.stderr", GoneTerminal())
    assert cli.main(["node"]) == 128 + signal.SIGHUP
