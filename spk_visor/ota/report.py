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
