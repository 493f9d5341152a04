"""The fleet runner: bounded parallelism, the order of results, hung nodes that stop
counting against the bound, the failure summary and the progress bar. No network: the work
items are functions that block on events, so nothing here depends on the machine's speed."""

from __future__ import annotations

import io
import threading
import time

import pytest

from spk_visor.commands.common import failure_summary
from spk_visor.config import SshSpec, Target
from spk_visor.connection import (
    SLOW_FACTOR,
    SLOW_FLOOR,
    SLOW_SAMPLES,
    NodeResult,
    bounded_map,
    slow_threshold,
)
from spk_visor.errors import TransportError, UsageError
from spk_visor.output import Console
from spk_visor.progress import fleet_progress

WAIT = 20.0  # bounds every wait below; none is expected to come near it


def targets(n: int) -> list[Target]:
    return [Target(name=f"n{i}", url=f"http://10.0.0.{i}:8080") for i in range(n)]


def test_order_kept_and_limit_respected() -> None:
    lock = threading.Lock()
    running = 0
    peak = 0

    def fn(t: Target) -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        threading.Event().wait(0.005)
        with lock:
            running -= 1
        return t.name

    items = targets(60)
    assert bounded_map(fn, items, 4) == [t.name for t in items]
    assert 1 <= peak <= 4


def test_hung_nodes_stop_counting_against_the_limit() -> None:
    """Four hung nodes and a limit of two: without parking, the other six would wait
    behind the hung ones forever (here: until released); with it they all run."""
    release = threading.Event()
    started = threading.Semaphore(0)
    fast_done = threading.Event()
    done_count = 0
    lock = threading.Lock()

    def fn(t: Target) -> str:
        nonlocal done_count
        started.release()
        if int(t.name[1:]) < 4:
            assert release.wait(WAIT), "never released"
        else:
            with lock:
                done_count += 1
                if done_count == 6:
                    fast_done.set()
        return t.name

    items = targets(10)
    result: list[list[str]] = []
    runner = threading.Thread(
        target=lambda: result.append(bounded_map(fn, items, 2, slow_after=0.05)), daemon=True
    )
    runner.start()
    try:
        # The six fast nodes finish while all four slow ones still hang.
        assert fast_done.wait(WAIT), f"only {done_count} fast nodes ran"
    finally:
        release.set()
    runner.join(WAIT)
    assert result == [[t.name for t in items]]


def test_without_slow_after_a_hung_node_holds_its_slot() -> None:
    """The control for the test above: the bound is real when nothing is parked."""
    release = threading.Event()
    ran: list[str] = []

    def fn(t: Target) -> str:
        if t.name == "n0":
            assert release.wait(WAIT)
        ran.append(t.name)
        return t.name

    runner = threading.Thread(target=lambda: bounded_map(fn, targets(3), 1), daemon=True)
    runner.start()
    runner.join(0.3)
    assert ran == []  # n1 and n2 wait behind n0
    release.set()
    runner.join(WAIT)
    assert ran == ["n0", "n1", "n2"]


def test_an_exception_in_a_worker_reaches_the_caller() -> None:
    def fn(t: Target) -> str:
        if t.name == "n3":
            raise KeyboardInterrupt
        return t.name

    with pytest.raises(KeyboardInterrupt):
        bounded_map(fn, targets(8), 3)


def test_failure_summary_groups_causes_without_addresses() -> None:
    items = targets(6)
    results: list[NodeResult[str]] = [NodeResult(items[0], value="ok")]
    for t in items[1:4]:
        results.append(NodeResult(t, error=TransportError(f"no answer from {t.url} within 3 s")))
    for t in items[4:]:
        results.append(NodeResult(t, error=TransportError(f"connection refused at {t.url}")))
    assert failure_summary(results) == (
        "5 of 6 nodes failed: 3 no answer within 3 s, 2 connection refused"
    )
    assert failure_summary(results[:1]) == ""
    one: list[NodeResult[str]] = [NodeResult(items[0], error=UsageError("bad token"))]
    assert failure_summary(one) == "1 of 1 nodes failed: 1 bad token"


def test_failure_summary_when_the_address_holds_the_node_name() -> None:
    """Inventory hosts are named by their host name, which their address holds too: the
    whole address goes, not the name out of the middle of it ("from http://:8080"), for
    every node alike (the old code took the two out in set order, which varies per string
    with the hash seed, so some nodes' causes came apart from the others')."""
    results: list[NodeResult[str]] = []
    for i in range(20):
        host = f"node{i:02d}.rack1"
        t = Target(name=host, url=f"http://{host}:8080")
        results.append(NodeResult(t, error=TransportError(f"no answer from {t.url} within 3 s")))
    ssh = Target(name="node20.rack1", ssh=SshSpec("node20.rack1", "admin", 2222))
    results.append(
        NodeResult(ssh, error=TransportError(f"cannot reach {ssh.address}: connection refused"))
    )
    assert failure_summary(results) == (
        "21 of 21 nodes failed: 20 no answer within 3 s, 1 cannot reach connection refused"
    )


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal() -> None:
    tty = _Tty()
    with fleet_progress(Console(out=io.StringIO(), err=tty), 20) as tick:
        for _ in range(20):
            tick(None)
    assert "nodes:" in tty.getvalue() and "/20 " in tty.getvalue()
    plain = io.StringIO()
    with fleet_progress(Console(out=io.StringIO(), err=plain), 20) as tick:
        tick(None)
    assert plain.getvalue() == ""


def test_slow_is_a_multiple_of_the_answers_seen_between_a_floor_and_the_cap() -> None:
    assert slow_threshold([], 0.5) == 0.5
    # Too few answers to judge: the cap.
    assert slow_threshold([0.01] * (SLOW_SAMPLES - 1), 0.5) == 0.5
    # Nodes that answer in 30 ms: one silent for four times that is set aside.
    assert slow_threshold([0.03] * SLOW_SAMPLES, 0.5) == pytest.approx(SLOW_FACTOR * 0.03)
    # The median, not the mean: a few hung nodes among the answers do not raise it.
    assert slow_threshold([0.03] * 10 + [3.0] * 3, 0.5) == pytest.approx(SLOW_FACTOR * 0.03)
    assert slow_threshold([0.001] * 20, 0.5) == SLOW_FLOOR
    # Slow answers everywhere (logins over SSH): never more than the cap.
    assert slow_threshold([0.4] * 20, 0.5) == 0.5


def test_a_hung_node_is_set_aside_sooner_once_others_have_answered_fast() -> None:
    """Limit 1: twenty instant items, then a hung one, then one more. The last starts
    while the hung one still runs (it was set aside), and no sooner than the threshold
    the instant ones made, which is well under the half-second cap; the hung item is
    released only once the last has run, so nothing here depends on the machine's speed
    except the lower bound."""
    release = threading.Event()
    hung_started: list[float] = []
    last_started: list[float] = []

    def fn(t: Target) -> str:
        if t.name == "n20":
            hung_started.append(time.monotonic())
            assert release.wait(WAIT), "never released"
        elif t.name == "n21":
            last_started.append(time.monotonic())
            release.set()
        return t.name

    items = targets(22)
    assert bounded_map(fn, items, 1, slow_after=WAIT) == [t.name for t in items]
    # With a fixed threshold of WAIT the last item would have waited for the release.
    assert last_started and hung_started
    assert last_started[0] - hung_started[0] >= SLOW_FLOOR
