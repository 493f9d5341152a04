"""How OTA events reach the operator: NDJSON under --json, a bar and phase lines on a
terminal, nothing but errors under -q (cron)."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


class Reporter:
    def __init__(
        self, *, as_json: bool, quiet: bool, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._bar: Any = None
        self._bar_phase: str | None = None

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if self.as_json:
            self.out.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")
            self.out.flush()
            return
        if self.quiet:
            return
        if event == "progress":
            self._progress(fields)
        elif event == "phase":
            self._close_bar()
            detail = ", ".join(
                f"{k}={v}" for k, v in fields.items() if k not in ("component", "phase")
            )
            line = f"{fields.get('component', '')}: {fields.get('phase', '')}"
            self.err.write(f"{line} ({detail})\n" if detail else line + "\n")
        elif event == "log":
            self._close_bar()
            self.err.write(f"{fields.get('message', '')}\n")

    def _progress(self, fields: dict[str, Any]) -> None:
        if not self.err.isatty():
            return
        phase = str(fields.get("phase", ""))
        if self._bar is None or self._bar_phase != phase:
            self._close_bar()
            from tqdm import tqdm  # noqa: PLC0415 (only a terminal pays for it)

            self._bar = tqdm(
                total=int(fields.get("total") or 0) or None,
                desc=phase,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.err,
                leave=False,
            )
            self._bar_phase = phase
        self._bar.n = int(fields.get("bytes", 0))
        self._bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def result(self, code: int, **fields: Any) -> None:
        self._close_bar()
        if self.as_json:
            self("result", {"exit_code": int(code), **fields})

    def close(self) -> None:
        self._close_bar()


# ---- the outcome of an apply or pull, in words --------------------------------------------

# ExitCode values, spelled out: this module is loaded only for OTA commands and must not
# pull the CLI's error module into the worker.
_OK, _REBOOT, _ROLLED_BACK, _NOT_ELIGIBLE, _OPERATOR, _UNCHANGED = 0, 4, 5, 8, 9, 77


def one_line(*parts: str | None) -> str:
    """Parts joined into one line (cron mails stderr; one line per run reads best)."""
    return "; ".join(" ".join(p.split()) for p in parts if p and p.strip())


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} GiB"


def outcome(code: int, doc: dict[str, Any], status: dict[str, Any]) -> str:
    """What an apply or pull did, as one line: `doc` is its result (the plan and what was
    decided), `status` the node's status afterwards (engine.status) for the cause."""
    version = doc.get("version")
    release = f"release {version}" if version else "the release"
    daemon = status.get("daemon") or {}
    base = status.get("base") or {}
    op = status.get("op") or {}
    if code == _ROLLED_BACK:
        why = daemon.get("reason") or base.get("reason") or op.get("error")
        return one_line(f"{release} was rolled back: {why or 'it failed its health checks'}")
    if code == _OPERATOR:
        why = daemon.get("reason") or daemon.get("error") or base.get("error") or op.get("error")
        return one_line(
            f"{release} needs an operator: {why or 'automatic recovery gave up'}",
            "see spk-visor ota status",
        )
    if code == _REBOOT:
        slot = f" in slot {base['slot']}" if base.get("slot") else ""
        return f"base {version or ''} staged{slot}: reboot to try it (ota discard cancels)"
    if code == _NOT_ELIGIBLE:
        notes = doc.get("notes") or []
        return one_line(f"{release} is not applied now", *[str(n) for n in notes])
    if code in (_OK, _UNCHANGED):
        if doc.get("detached"):
            return f"{release} is being applied in the background: spk-visor ota status --follow"
        if doc.get("changes") is False:
            counter = doc.get("counter")
            extra = f" (counter {counter})" if counter is not None else ""
            return f"up to date: {release}{extra} is installed"
        if doc.get("changed") is False:
            got = doc.get("downloaded") or doc.get("download_bytes") or 0
            fetched = f"downloaded ({_size(int(got))})" if got else "in the store"
            return (
                f"{release} is {fetched}, not applied: this node's policy does not apply it "
                "unattended (give --apply-daemon or --stage-base, or set apply_daemon or "
                "stage_base in ota.conf)"
            )
        downtime = daemon.get("downtime_ms")
        if daemon.get("awaiting_commit"):
            return f"{release} is running in probation: spk-visor ota commit keeps it"
        extra = f", {downtime} ms of daemon downtime" if isinstance(downtime, int) else ""
        return f"{release} applied{extra}"
    why = op.get("error") or daemon.get("error") or base.get("error") or f"exit {code}"
    return one_line(f"{release} failed: {why}")
