"""Everything an OTA step needs about the node, in one object passed down the layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spk_visor.ota.journal import Floor, History, Installed, Journal
from spk_visor.ota.nodeconf import NodeConfig, NodePaths, load_config, node_paths
from spk_visor.ota.store import BlobStore

# An event for the operator: ("phase", {"component": ..., "phase": ...}),
# ("progress", {"phase": ..., "bytes": n, "total": m}), ("log", {"message": ...}).
Emit = Callable[[str, dict[str, Any]], None]


def _quiet(_event: str, _fields: dict[str, Any]) -> None:
    return None


@dataclass
class OtaContext:
    paths: NodePaths
    config: NodeConfig
    emit: Emit = field(default=_quiet)

    @property
    def journal(self) -> Journal:
        return Journal(self.paths)

    @property
    def floor(self) -> Floor:
        return Floor(self.paths)

    @property
    def history(self) -> History:
        return History(self.paths)

    @property
    def installed(self) -> Installed:
        return Installed(self.paths)

    @property
    def store(self) -> BlobStore:
        return BlobStore(self.paths)

    def log(self, message: str) -> None:
        self.emit("log", {"message": message})


def load_context(emit: Emit | None = None) -> OtaContext:
    paths = node_paths()
    return OtaContext(paths, load_config(paths), emit or _quiet)
