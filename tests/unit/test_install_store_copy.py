"""StoreCopy: a record put while the copy is being stopped is refused, never dropped."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from spk_visor.install.store_copy import StoreCopy

PIPE_MAX = 1 << 20  # more than a pipe holds: the store thread's write blocks on it


def test_a_put_waiting_for_room_when_the_copy_stops_is_refused_not_dropped() -> None:
    r, w = os.pipe()
    copy = StoreCopy(w, 1, lambda e: RuntimeError(str(e)))
    outcome: list[BaseException | None] = []
    second_put = threading.Thread(
        target=lambda: outcome.append(_put(copy, memoryview(b"b" * 10))), daemon=True
    )
    stopper = threading.Thread(target=copy.stop, daemon=True)
    try:
        copy.put(memoryview(b"a" * PIPE_MAX))  # the thread now blocks writing it
        second_put.start()  # waits for room (depth 1)
        time.sleep(0.2)
        stopper.start()  # the sink closed from another thread: the end marker goes in
        time.sleep(0.2)
        drained = 0
        deadline = time.monotonic() + 30
        while drained < PIPE_MAX and time.monotonic() < deadline:
            drained += len(os.read(r, 1 << 16))
        stopper.join(30)
        second_put.join(30)
        assert not stopper.is_alive() and not second_put.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], ValueError), (
            f"the put after stop returned {outcome[0]!r}: its record was silently dropped"
        )
        assert copy.count == PIPE_MAX
    finally:
        os.close(w)
        os.close(r)


def _put(copy: StoreCopy, view: memoryview) -> BaseException | None:
    try:
        copy.put(view)
    except BaseException as e:  # the outcome is what the test checks
        return e
    return None


def test_finish_returns_the_size_and_sha256_of_what_was_written(tmp_path: Path) -> None:
    path = os.path.join(str(tmp_path), "blob")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copy = StoreCopy(fd, 2, lambda e: RuntimeError(str(e)))
        parts = [os.urandom(n) for n in (1, 4096, 70000, 3)]
        for p in parts:
            copy.put(memoryview(p))
        size, digest = copy.finish()
    finally:
        os.close(fd)
    data = b"".join(parts)
    assert size == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    with open(path, "rb") as f:
        assert f.read() == data
