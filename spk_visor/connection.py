"""From a resolved Target to a ready Client, and the same over a whole fleet in parallel."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from spk_visor.client import Client
from spk_visor.config import Settings, Target, read_local_token
from spk_visor.errors import SpkVisorError
from spk_visor.transport import open_transport

T = TypeVar("T")
R = TypeVar("R")
# Enough to hide latency across a rack, few enough not to hammer a jump host.
MAX_PARALLEL = 16


def connect(target: Target, settings: Settings) -> Client:
    transport = open_transport(
        target, settings.timeout, settings.accept_new, settings.ca_file, settings.insecure_http
    )
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
    return _bounded_map(one, targets, MAX_PARALLEL)


def _bounded_map(fn: Callable[[Target], R], items: Sequence[Target], limit: int) -> list[R]:
    """`[fn(x) for x in items]` on at most `limit` threads, in the items' order.

    Not a ThreadPoolExecutor: on Ctrl-C its shutdown, and the interpreter's exit, wait for
    every queued node to time out in turn. These workers are daemon threads that take no
    new node once the caller is interrupted, so spk-visor exits (130) at once.
    """
    results: list[R | None] = [None] * len(items)
    pending = queue.SimpleQueue[int]()
    for index in range(len(items)):
        pending.put(index)
    stop = threading.Event()
    failure: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set():
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            try:
                results[index] = fn(items[index])
            except BaseException as e:  # re-raised in the caller's thread
                failure.append(e)
                stop.set()
                return

    threads = [
        threading.Thread(target=worker, name=f"fleet-{n}", daemon=True)
        for n in range(min(limit, len(items)))
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()  # interruptible: Ctrl-C lands here
    finally:
        stop.set()
    if failure:
        raise failure[0]
    return cast(list[R], results)
