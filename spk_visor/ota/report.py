"""How OTA events reach the operator: NDJSON under --json, a bar and phase lines on a
terminal, nothing but errors under -q (cron)."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
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


# ---- status, check and inspect for people -------------------------------------------------


def width() -> int:
    """The terminal's width (COLUMNS first), 80 when output is not a terminal."""
    return max(20, shutil.get_terminal_size((80, 24)).columns)


def clean(value: object) -> str:
    """`value` as one line of harmless text: control characters (terminal escapes,
    newlines from an unverified manifest) shown escaped, never interpreted."""
    text = value if isinstance(value, str) else str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def words(value: object, absent: str = "none") -> str:
    """Absent values and booleans in words."""
    if value is None or value in ("", [], {}):
        return absent
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(clean(v) for v in value)
    return clean(value)


def fields(rows: list[tuple[str, str]], columns: int | None = None) -> str:
    """`label: value` lines, values aligned and wrapped to the width; a word longer than
    a line (a hash) is cut with an ellipsis."""
    columns = columns or width()
    label_w = min(max(len(label) for label, _ in rows) + 2, columns // 2)
    room = max(10, columns - label_w)
    out = []
    for label, value in rows:
        lines = textwrap.wrap(value, room, break_long_words=False, break_on_hyphens=False) or [""]
        for i, line in enumerate(lines):
            head = f"{label}: ".ljust(label_w) if i == 0 else " " * label_w
            out.append(cut(head + line, columns).rstrip())
    return "\n".join(out)


def _entry(entry: dict[str, Any]) -> str:
    """A journal entry (daemon, base, op) in words."""
    phase = clean(entry.get("phase") or "idle")
    parts = []
    labels = (
        ("version", "version"),
        ("target", "release"),
        ("slot", "slot"),
        ("downtime_ms", "downtime ms"),
        ("exit_code", "exit"),
    )
    for key, label in labels:
        if entry.get(key) not in (None, ""):
            parts.append(f"{label} {clean(entry[key])}")
    for key in ("reason", "error"):
        if entry.get(key):
            parts.append(clean(entry[key]))
    # Which health checks failed a trial boot, and what they printed: what to fix.
    failures = entry.get("failures")
    if isinstance(failures, list) and failures:
        parts.append("failed: " + "; ".join(clean(f) for f in failures))
    if entry.get("updated"):
        parts.append(f"since {clean(entry['updated'])}")
    return phase + (": " + ", ".join(parts) if parts else "")


def status_text(doc: dict[str, Any]) -> str:
    installed = doc.get("installed") or {}
    if installed.get("version"):
        release = f"{clean(installed['version'])} (counter {clean(installed.get('counter', 0))})"
    else:
        release = "none installed yet"
    rows = [
        ("installed", release),
        ("floor", f"counter {words(doc.get('counter_floor'), '0')}: older releases are refused"),
        ("daemon", _entry(doc.get("daemon") or {})),
        ("current", words(doc.get("current"))),
        ("previous", words(doc.get("previous"))),
        ("base", _entry(doc.get("base") or {})),
        ("booted slot", words(doc.get("booted_slot"), "unknown")),
        ("last run", _entry(doc.get("op") or {})),
    ]
    if doc.get("lock"):
        rows.append(("running now", clean(doc["lock"])))
    if (doc.get("base") or {}).get("phase") == "staged":
        rows.append(("to do", "a base image is staged: reboot to try it (ota discard cancels)"))
    return fields(rows)


_DAEMON_PLAN = {
    "swap": "swap: the running daemon is replaced live",
    "unchanged": "unchanged: already installed",
    "deferred": "deferred: waits for a base reboot",
    "absent": "not in this release",
}
_BASE_PLAN = {
    "stage": "stage: written to the other slot, then a reboot",
    "unchanged": "unchanged: already installed",
    "absent": "not in this release",
}


def check_text(doc: dict[str, Any]) -> str:
    size = int(doc.get("download_bytes") or 0)
    rows = [
        ("manifest", clean(doc.get("manifest", ""))),
        ("daemon", _DAEMON_PLAN.get(str(doc.get("daemon")), clean(doc.get("daemon")))),
        ("base", _BASE_PLAN.get(str(doc.get("base")), clean(doc.get("base")))),
        ("downgrade", words(bool(doc.get("downgrade")))),
        ("download", _size(size) if size else "nothing"),
        ("changes", words(bool(doc.get("changes")))),
        ("notes", words(doc.get("notes"))),
    ]
    version, counter = clean(doc.get("version")), clean(doc.get("counter"))
    head = f"all checks passed: release {version} (counter {counter})"
    return cut(head, width()) + "\n" + fields(rows)


def _at(doc: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _component(name: str, comp: object) -> str:
    kind = clean(_at(comp, "class") or "?")
    version = clean(_at(comp, "version") or "?")
    text = f"{kind} {version}"
    files = _at(comp, "tree", "files")
    if isinstance(files, list):
        total = sum(
            f.get("s", 0) for f in files if isinstance(f, dict) and isinstance(f.get("s"), int)
        )
        text += f", {len(files)} files ({_size(total)})"
    probation = _at(comp, "health", "probation_s")
    if isinstance(probation, int | float) and not isinstance(probation, bool):
        text += f", probation {probation:g} s"
    raw = _at(comp, "image", "raw_size")
    if isinstance(raw, int) and not isinstance(raw, bool):
        text += f", {_size(raw)} raw, {clean(_at(comp, 'image', 'encoding') or '?')}"
    return text


def inspect_text(doc: dict[str, Any]) -> str:
    """A bundle's unverified manifest, summarised (every value escaped and cut)."""
    m = doc.get("manifest")
    release = _at(m, "release")
    rows = [
        (
            "release",
            f"{words(_at(release, 'version'), '?')}, counter "
            f"{words(_at(release, 'counter'), '?')}, sets floor "
            f"{words(_at(release, 'set_floor'), '0')}",
        ),
        ("product", f"{words(_at(m, 'product'), '?')} ({words(_at(m, 'compatible'))})"),
        ("development", words(bool(_at(m, "dev")))),
        ("created", words(_at(m, "created"), "unknown")),
        ("needs", f"spk-visor {words(_at(m, 'requires', 'agent_min'), 'any')} or later"),
        ("manifest", clean(doc.get("manifest_sha256", ""))),
        (
            "signatures",
            f"{len(doc.get('signatures') or [])} "
            f"({words([str(k)[:16] for k in doc.get('signatures') or []])})",
        ),
        ("roots", f"{doc.get('roots') or 'none'} carried"),
    ]
    components = _at(m, "components")
    if isinstance(components, dict):
        for name, comp in components.items():
            rows.append((cut(clean(name), 24), _component(name, comp)))
    blobs = _at(m, "blobs")
    if isinstance(blobs, list):
        total = sum(
            b.get("size", 0)
            for b in blobs
            if isinstance(b, dict) and isinstance(b.get("size"), int)
        )
        rows.append(("blobs", f"{len(blobs)}, {_size(total)} in all"))
    head = "NOT VERIFIED (spk-visor ota verify checks it)"
    return cut(head, width()) + "\n" + fields(rows)
