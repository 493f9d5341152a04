"""What every command shares: the lazily resolved settings, the console, and running one
library call against one node or a fleet."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, NamedTuple, TypeVar

import typer

from spk_visor import config
from spk_visor.client import Client
from spk_visor.connection import NodeResult, connect, for_each
from spk_visor.errors import ExitCode, RefusedError, UsageError
from spk_visor.output import Column, Console

T = TypeVar("T")


class Options(NamedTuple):  # not a dataclass: start-up time (see output.Console)
    node: str | None
    ssh: str | None
    daemon_port: int | None
    fleet: str | None
    token: str | None
    json: bool
    timeout: float | None
    accept_new: bool
    verbose: bool
    ca_file: str | None = None
    insecure_http: bool = False
    inventory: str | None = None
    parallel: int | None = None


class AppState:
    """Built by the root callback; settings are resolved on first use so that `version`,
    `about` and `--help` work even with a broken config file."""

    def __init__(self, options: Options, console: Console) -> None:
        self.options = options
        self.console = console
        self._settings: config.Settings | None = None
        self.json_requested = False
        # -q as the command parsed it (ota apply/pull): main() then says a failure on one line.
        self.quiet = False

    @property
    def settings(self) -> config.Settings:
        if self._settings is None:
            o = self.options
            self._settings = config.resolve(
                node=o.node,
                ssh=o.ssh,
                daemon_port=o.daemon_port,
                fleet=o.fleet,
                token=o.token,
                timeout=o.timeout,
                accept_new=o.accept_new,
                ca_file=o.ca_file,
                insecure_http=o.insecure_http,
                inventory=o.inventory,
                parallel=o.parallel,
            )
        return self._settings

    @property
    def json(self) -> bool:
        return self.options.json or self.json_requested

    def show(self, doc: Any, render: Callable[[Any], str]) -> None:
        """The daemon's document as JSON under --json, else its human rendering."""
        if self.json:
            self.console.json(doc)
        else:
            self.console.print(render(doc))

    def one(self, work: Callable[[Client], T]) -> T:
        """Run against the single target; --fleet is refused for this command."""
        settings = self.settings
        if settings.fleet:
            raise UsageError("--fleet is not supported by this command; use --node")
        client = connect(settings.targets[0], settings)
        try:
            return work(client)
        finally:
            client.close()

    def fleet(self, work: Callable[[Client], T]) -> list[NodeResult[T]]:
        """`work` on every target; a bar on a terminal's stderr while a fleet answers, and
        a summary of the failures by cause on stderr after it."""
        from spk_visor.progress import fleet_progress  # noqa: PLC0415 (fleets only: start-up)

        settings = self.settings
        with fleet_progress(self.console, len(settings.targets)) as tick:
            results = for_each(settings, work, on_done=tick)
        if len(results) > 1:
            summary = failure_summary(results)
            if summary:
                self.console.error(summary)
        return results


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Machine-readable output (same as the global --json).")
]


def state(ctx: typer.Context, as_json: bool = False) -> AppState:
    """The app's state; `as_json` is the command's own --json, so that both
    `spk-visor --json node` and `spk-visor node --json` work."""
    obj = ctx.find_root().obj
    if not isinstance(obj, AppState):  # only when a command is invoked outside the app
        raise TypeError("spk-visor commands need the root app's context")
    if as_json:
        obj.json_requested = True
    return obj


def show_fleet(
    st: AppState,
    results: list[NodeResult[T]],
    headers: Sequence[str | Column],
    row: Callable[[T], Sequence[Any]],
) -> int:
    """One row per node, an error row for a node that failed; the exit code is 0 only
    when every node answered (else the first failure's)."""
    return show_fleet_rows(st, results, headers, lambda value: [row(value)])


def show_fleet_rows(
    st: AppState,
    results: list[NodeResult[T]],
    headers: Sequence[str | Column],
    rows: Callable[[T], Sequence[Sequence[Any]]],
    empty: str = "ok",
) -> int:
    """Like show_fleet, for answers that make several rows per node (`vm list`): each row
    is prefixed with its node; a node with no rows still gets one, with `empty` as its
    status, so every node of the group shows up."""
    if st.json:
        # A node's failure is the document a failed single-node command prints.
        st.console.json(
            {r.target.name: r.error.document() if r.error is not None else r.value for r in results}
        )
    else:
        lines: list[list[Any]] = []
        blank = [""] * len(headers)
        # A node that did not answer: its values are not known (not absent, as "none"
        # would say), and an empty cell says nothing.
        unknown = ["unknown"] * len(headers)
        for r in results:
            if r.error is not None:
                lines.append([r.target.name, f"error: {r.error.message}", *unknown])
                continue
            node_rows = rows(r.value)  # type: ignore[arg-type]
            if not node_rows:
                lines.append([r.target.name, empty, *blank])
            lines.extend([r.target.name, "ok", *row] for row in node_rows)
        st.console.table([Column("node"), Column("status", fit="wrap"), *headers], lines)
    for r in results:
        if r.error is not None:
            return int(r.error.exit_code)
    return ExitCode.OK


# The node's own address stands in a message as this word, so that one pattern, compiled
# once, takes it out of every node's message: a pattern per node cost ~0.3 ms of CPU for
# each failed node (13 ms for 50 hung nodes, all of it after the last one's deadline).
_OWN = "spkvisor0own0node"
_OWN_WORDS = re.compile(rf"\s*\b(?:from|at|to|with)?\s*{_OWN}:?")


def failure_summary(results: Sequence[NodeResult[Any]]) -> str:
    """`3 of 1000 nodes failed: 2 connection refused, 1 no answer within 10 s`: the
    causes grouped by their message with the node's own address taken out, most common
    first, so that a rack's worth of one failure reads as one line."""
    causes: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            cause = r.error.message
            # The longer first: an address can hold the node's name ("http://n1:8080").
            for own in sorted({r.target.address, r.target.name}, key=len, reverse=True):
                if own:
                    cause = cause.replace(own, _OWN)
            # "no answer from http://10.0.0.5:8080 within 10 s" -> "no answer within 10 s"
            cause = _OWN_WORDS.sub("", cause)
            cause = " ".join(cause.split()).strip(" :") or "failed"
            causes[cause] = causes.get(cause, 0) + 1
    if not causes:
        return ""
    failed = sum(causes.values())
    parts = ", ".join(f"{n} {cause}" for cause, n in sorted(causes.items(), key=lambda c: -c[1]))
    return f"{failed} of {len(results)} nodes failed: {parts}"


def confirm(st: AppState, question: str, *, yes: bool, action: str) -> bool:
    """The operator's answer to `question`; `--yes` answers for scripts. Without a
    terminal to ask on, refuse rather than guess (a cron job must never reboot a node or
    delete a VM because nobody was there to say no)."""
    if yes:
        return True
    if not st.console.in_is_tty:
        raise RefusedError(
            f"refusing to {action} without confirmation: stdin is not a terminal",
            "pass --yes to confirm from a script",
        )
    # Not typer.confirm: it writes part of its prompt to stdout, which --json keeps for
    # the document alone. End of input counts as "no".
    answer = st.console.prompt(f"{question} [y/N] ")
    return answer.strip().lower() in ("y", "yes")
