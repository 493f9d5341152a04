"""What every command shares: the lazily resolved settings, the console, and running one
library call against one node or a fleet."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import typer

from spk_visor import config
from spk_visor.client import Client
from spk_visor.connection import NodeResult, connect, for_each
from spk_visor.errors import ExitCode, UsageError
from spk_visor.output import Console, table

T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    node: str | None
    ssh: str | None
    fleet: str | None
    token: str | None
    json: bool
    timeout: float | None
    accept_new: bool
    verbose: bool


class AppState:
    """Built by the root callback; settings are resolved on first use so that `version`,
    `about` and `--help` work even with a broken config file."""

    def __init__(self, options: Options, console: Console) -> None:
        self.options = options
        self.console = console
        self._settings: config.Settings | None = None

    @property
    def settings(self) -> config.Settings:
        if self._settings is None:
            o = self.options
            self._settings = config.resolve(
                node=o.node,
                ssh=o.ssh,
                fleet=o.fleet,
                token=o.token,
                timeout=o.timeout,
                json=o.json,
                verbose=o.verbose,
                accept_new=o.accept_new,
            )
        return self._settings

    @property
    def json(self) -> bool:
        return self.options.json

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
        return for_each(self.settings, work)


def state(ctx: typer.Context) -> AppState:
    obj = ctx.find_root().obj
    if not isinstance(obj, AppState):  # only when a command is invoked outside the app
        raise TypeError("spk-visor commands need the root app's context")
    return obj


def show_fleet(
    st: AppState,
    results: list[NodeResult[T]],
    headers: Sequence[str],
    row: Callable[[T], Sequence[Any]],
) -> int:
    """One row per node, an error row for a node that failed; the exit code is 0 only
    when every node answered (else the first failure's)."""
    if st.json:
        st.console.json(
            {
                r.target.name: r.value
                if r.ok
                else {
                    "error": {
                        "message": r.error.message if r.error else "",
                        "exit_code": int(r.error.exit_code) if r.error else 0,
                    }
                }
                for r in results
            }
        )
    else:
        rows = []
        for r in results:
            if r.error is None:
                rows.append([r.target.name, "ok", *row(r.value)])  # type: ignore[arg-type]
            else:
                rows.append([r.target.name, f"error: {r.error.message}", *([""] * len(headers))])
        st.console.print(table(["node", "status", *headers], rows))
    for r in results:
        if r.error is not None:
            return int(r.error.exit_code)
    return ExitCode.OK
