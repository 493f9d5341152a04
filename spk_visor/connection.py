"""From a resolved Target to a ready Client, and the same over a whole fleet in parallel."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from spk_visor.client import Client
from spk_visor.config import Settings, Target, read_local_token
from spk_visor.errors import SpkVisorError
from spk_visor.transport import open_transport

T = TypeVar("T")
# Enough to hide latency across a rack, few enough not to hammer a jump host.
MAX_PARALLEL = 16


def connect(target: Target, settings: Settings) -> Client:
    transport = open_transport(target, settings.timeout, settings.accept_new)
    try:
        token = read_local_token(target)
        if token is None and target.ssh is not None and not target.token_file:
            # Over SSH the login is the credential: read the node's own token file.
            token = transport.read_remote_token(target.remote_token_file)
    except BaseException:
        transport.close()
        raise
    return Client(transport, target, token)


@dataclass
class NodeResult(Generic[T]):
    target: Target
    value: T | None = None
    error: SpkVisorError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def for_each(settings: Settings, work: Callable[[Client], T]) -> list[NodeResult[T]]:
    """Run `work` against every target, in parallel, in the targets' order. A node that
    fails gets its error in its own result; the others still answer."""

    def one(target: Target) -> NodeResult[T]:
        try:
            client = connect(target, settings)
        except SpkVisorError as e:
            return NodeResult(target, error=e)
        try:
            return NodeResult(target, value=work(client))
        except SpkVisorError as e:
            return NodeResult(target, error=e)
        finally:
            client.close()

    targets = settings.targets
    if len(targets) == 1:
        return [one(targets[0])]
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(targets))) as pool:
        return list(pool.map(one, targets))
