"""From a resolved Target to a ready Client, and the same over a whole fleet in parallel."""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from spk_visor.client import Client
from spk_visor.config import Settings, Target, read_local_token
from spk_visor.errors import SpkVisorError
from spk_visor.transport import open_transport

T = TypeVar("T")
R = TypeVar("R")


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
    # How long this node took, from the start of its connection to its result: a hung
    # node's is its deadline (and the moment it took to notice), whatever the fleet did.
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def for_each(
    settings: Settings,
    work: Callable[[Client], T],
    on_done: Callable[[NodeResult[T]], None] | None = None,
) -> list[NodeResult[T]]:
    """Run `work` against every target, in parallel, in the targets' order. A node that
    fails gets its error in its own result; the others still answer. `on_done` sees each
    result as it lands (a progress bar)."""

    def one(target: Target) -> NodeResult[T]:
        result: NodeResult[T]
        begun = time.monotonic()
        try:
            client = connect(target, settings)
        except SpkVisorError as e:
            result = NodeResult(target, error=e)
        else:
            try:
                result = NodeResult(target, value=work(client))
            except SpkVisorError as e:
                result = NodeResult(target, error=e)
            finally:
                client.close()
        result.seconds = time.monotonic() - begun
        if on_done is not None:
            on_done(result)
        return result

    targets = settings.targets
    if len(targets) == 1:
        return [one(targets[0])]
    return bounded_map(one, targets, settings.parallel, slow_after=SLOW_AFTER)


# A node that has not answered after this long is probably down and will use its whole
# deadline: its worker stops counting against --parallel, so that a few dead nodes cannot
# hold every slot while the live ones wait in the queue.
SLOW_AFTER = 0.5
# Once enough nodes have answered, "slow" is SLOW_FACTOR times their median time (at least
# SLOW_FLOOR, at most SLOW_AFTER): on a LAN a node answers in milliseconds, and half a
# second per hung node is half a second of a slot that live nodes behind it could use
# (200 hung nodes among 1,000 filled the 64 slots, and added 4.7 to 5.5 s to a 3 s
# deadline; now 3.5 s: docs/fleet.md). A node that is merely slow and is set aside costs
# one more thread, not a wrong answer.
SLOW_FACTOR = 4.0
SLOW_FLOOR = 0.05
SLOW_SAMPLES = 8  # answers needed before their median counts; the last 64 are kept
# However many nodes hang, no more threads than this wait on them at once.
MAX_THREADS = 1024


def bounded_map(
    fn: Callable[[Target], R],
    items: Sequence[Target],
    limit: int,
    *,
    slow_after: float | None = None,
) -> list[R]:
    """`[fn(x) for x in items]` with at most `limit` items in progress, in the items' order.

    An item that has been running for `slow_after` seconds (or less: slow_threshold) no
    longer counts against `limit` (its thread finishes it, then exits, and a fresh worker
    takes its place), so dead nodes each cost their own deadline once, in parallel, not
    one after another.

    Not a ThreadPoolExecutor: on Ctrl-C its shutdown, and the interpreter's exit, wait for
    every queued node to time out in turn. These workers are daemon threads that take no
    new node once the caller is interrupted, so spk-visor exits (130) at once.
    """
    results: list[R | None] = [None] * len(items)
    pending = queue.SimpleQueue[int]()
    for index in range(len(items)):
        pending.put(index)
    stop = threading.Event()
    changed = threading.Condition()
    failure: list[BaseException] = []
    # Per worker: when its current item started (None while idle), and whether it has
    # been set aside as slow.
    started: dict[int, float | None] = {}
    parked: set[int] = set()
    threads: dict[int, threading.Thread] = {}
    took: collections.deque[float] = collections.deque(maxlen=64)  # the last items' times

    def worker(wid: int) -> None:
        try:
            while not stop.is_set() and wid not in parked:
                try:
                    index = pending.get_nowait()
                except queue.Empty:
                    return
                begun = started[wid] = time.monotonic()
                try:
                    results[index] = fn(items[index])
                except BaseException as e:  # re-raised in the caller's thread
                    failure.append(e)
                    stop.set()
                    return
                finally:
                    started[wid] = None
                took.append(time.monotonic() - begun)
        finally:
            with changed:
                started.pop(wid, None)
                changed.notify_all()

    def spawn() -> None:
        wid = len(threads)
        started[wid] = None
        thread = threading.Thread(target=worker, args=(wid,), name=f"fleet-{wid}", daemon=True)
        threads[wid] = thread
        thread.start()

    try:
        with changed:
            for _ in range(min(max(1, limit), len(items))):
                spawn()
            while started and not stop.is_set():
                # Interruptible: Ctrl-C lands here. Woken by each worker that ends, and
                # else at the very moment the oldest node turns slow by the threshold
                # known when it went to sleep (not on a poll: every 0.1 s tick once set
                # hung nodes aside up to 0.1 s late). Answers arriving meanwhile lower
                # the threshold only from the next wake: the first batch's hung nodes
                # wait out slow_after (0.5 s), later ones the measured threshold.
                slow = None if slow_after is None else slow_threshold(list(took), slow_after)
                changed.wait(timeout=_until_slow(started, parked, slow, pending))
                if slow is None or pending.empty():
                    continue
                now = time.monotonic()
                for wid, since in list(started.items()):
                    if since is not None and wid not in parked and now - since >= slow:
                        if len(started) >= MAX_THREADS:
                            break
                        parked.add(wid)
                        spawn()
    finally:
        stop.set()
    if failure:
        raise failure[0]
    return cast(list[R], results)


def slow_threshold(took: Sequence[float], slow_after: float) -> float:
    """After how long a node in progress is set aside: `slow_after` until SLOW_SAMPLES
    items have finished, then SLOW_FACTOR times their median, between SLOW_FLOOR and
    `slow_after`."""
    if len(took) < SLOW_SAMPLES:
        return slow_after
    median = sorted(took)[len(took) // 2]  # not statistics: its import costs every start 5 ms
    return min(slow_after, max(SLOW_FLOOR, SLOW_FACTOR * median))


# The longest the runner sleeps without being woken: only a safety net, nothing waits on it.
IDLE_WAIT = 1.0


def _until_slow(
    started: dict[int, float | None],
    parked: set[int],
    slow_after: float | None,
    pending: queue.SimpleQueue[int],
) -> float:
    """Seconds until the oldest node in progress has run `slow_after` (a node that starts
    later turns slow later still), or IDLE_WAIT when no node can be set aside (then only a
    worker that ends changes anything, and it wakes the runner)."""
    if slow_after is None or pending.empty() or len(started) >= MAX_THREADS:
        return IDLE_WAIT
    running = [s for w, s in list(started.items()) if s is not None and w not in parked]
    oldest = min(running, default=time.monotonic())
    return min(IDLE_WAIT, max(0.0, oldest + slow_after - time.monotonic()))
