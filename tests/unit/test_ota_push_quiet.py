"""`ota push -q` is for cron and scripts: no progress bars, even when stderr is a
terminal (they were drawn whenever it was one, -q or not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spk_visor import output
from spk_visor.ota import push
from tests.support import cli, fake_bundle


@pytest.mark.parametrize(("quiet", "bars"), [(["-q"], False), (["--quiet"], False), ([], True)])
def test_quiet_push_draws_no_progress_bars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet: list[str], bars: bool
) -> None:
    bundle = tmp_path / "b.spkb"
    fake_bundle.write(bundle, 1 << 16)
    seen: dict[str, Any] = {}

    def fake_push(path: Path, targets: object, **kwargs: Any) -> list[push.PushResult]:
        seen.update(kwargs)
        return []

    monkeypatch.setattr(push, "push", fake_push)
    monkeypatch.setattr(output.Console, "err_is_tty", property(lambda self: True))
    res = cli.run("--ssh", "root@127.0.0.1:1", "ota", "push", str(bundle), *quiet)
    assert res.code == 0, res
    assert seen["show_progress"] is bars, seen
