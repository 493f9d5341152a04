"""Who may talk to the deploy receiver, and how many code guesses anyone gets.

The policy and why it holds are in docs/deploy-security.md. In short: SPAKE2 gives an
attacker one online guess per attempt and nothing to test offline, so what matters is how
many attempts anyone gets, and that nobody can keep the real donor out without the code.

- Connections before authentication: at most `per_source_connections` from one address and
  `max_connections` in all. More are reset at once, without reading from them, so the
  accept loop never waits on a peer.
- Guesses per address: at most `source_guesses` wrong codes in any `source_window`, one
  attempt at a time, and `fail_delay` between attempts. An address over its budget is
  refused before the PAKE (no guess spent, none granted).
- Guesses per code: after `code_guesses` wrong codes from all addresses together the code
  is used up. It rotates, but never sooner than `min_code_life` after it was shown; until
  then every attempt is refused, so the new code stays on screen long enough to type and
  many addresses together get at most `code_guesses` per `min_code_life`.

An attempt counts from the moment the target accepts the donor's SPAKE2 message ("begin")
until its key confirmation is checked ("end"); attempts in flight count against both
budgets, so concurrent connections cannot overshoot them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# Addresses remembered at most; the oldest idle one is forgotten first. An attacker who
# spoofs more addresses than this only resets budgets of addresses already idle.
MAX_SOURCES = 4096


@dataclass(frozen=True)
class Policy:
    max_connections: int = 64
    per_source_connections: int = 4
    source_guesses: int = 3
    source_window: float = 600.0
    code_guesses: int = 10
    min_code_life: float = 120.0
    fail_delay: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "per_source_connections", "source_guesses"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.code_guesses <= self.source_guesses:
            # One address alone must never use up the code: the donor's code would rotate
            # under the operator's fingers (issue 11, defect 6).
            raise ValueError("code_guesses must exceed source_guesses")
        for name in ("source_window", "min_code_life", "fail_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass
class _Source:
    connections: int = 0
    in_flight: int = 0
    failures: deque[float] = field(default_factory=deque)
    last_failure: float = float("-inf")
    seen: float = 0.0


# Why an attempt is not allowed now (None: it is).
SOURCE_LIMITED = "source"
CODE_LOCKED = "locked"


class Guard:
    """Thread-safe counters for one receiver. `clock` is injectable for unit tests."""

    def __init__(self, policy: Policy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._sources: dict[str, _Source] = {}
        self._connections = 0
        self.epoch = 0
        self.code_born = clock()
        self.code_failures = 0
        self._code_in_flight = 0

    # -- connections --------------------------------------------------------------------

    def open(self, address: str) -> bool:
        """Reserve a connection slot for `address`; False: reset the connection."""
        with self._lock:
            if self._connections >= self.policy.max_connections:
                return False
            src = self._source(address)
            if src.connections >= self.policy.per_source_connections:
                return False
            src.connections += 1
            self._connections += 1
            return True

    def close(self, address: str) -> None:
        with self._lock:
            src = self._sources.get(address)
            if src is not None and src.connections > 0:
                src.connections -= 1
                self._connections -= 1

    # -- guesses ------------------------------------------------------------------------

    def refusal(self, address: str) -> str | None:
        """Why `address` may not try a code now, or None."""
        with self._lock:
            return self._refusal(address, self._clock())

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try again (0 if it may now): for the screen."""
        with self._lock:
            now = self._clock()
            waits = [0.0]
            if self.code_failures >= self.policy.code_guesses:
                waits.append(self.code_born + self.policy.min_code_life - now)
            src = self._sources.get(address)
            if src is not None:
                self._expire(src, now)
                waits.append(src.last_failure + self.policy.fail_delay - now)
                if len(src.failures) >= self.policy.source_guesses:
                    waits.append(src.failures[0] + self.policy.source_window - now)
            return max(waits)

    def begin(self, address: str, epoch: int) -> bool:
        """Take one attempt for `address` against the code of `epoch`; False: refused."""
        with self._lock:
            now = self._clock()
            if epoch != self.epoch or self._refusal(address, now) is not None:
                return False
            src = self._source(address)
            src.in_flight += 1
            self._code_in_flight += 1
            return True

    def end(self, address: str, *, wrong: bool) -> None:
        """The attempt `begin` granted is over: `wrong` when key confirmation failed."""
        with self._lock:
            src = self._source(address)
            src.in_flight = max(0, src.in_flight - 1)
            self._code_in_flight = max(0, self._code_in_flight - 1)
            if wrong:
                now = self._clock()
                src.failures.append(now)
                src.last_failure = now
                self.code_failures += 1

    def source_failures(self, address: str) -> int:
        with self._lock:
            src = self._sources.get(address)
            if src is None:
                return 0
            self._expire(src, self._clock())
            return len(src.failures)

    # -- the code -----------------------------------------------------------------------

    def used_up(self) -> bool:
        with self._lock:
            return self.code_failures >= self.policy.code_guesses

    def rotation_due(self) -> bool:
        """The code is used up and has been on screen for `min_code_life`."""
        with self._lock:
            return (
                self.code_failures >= self.policy.code_guesses
                and self._code_in_flight == 0
                and self._clock() - self.code_born >= self.policy.min_code_life
            )

    def rotated(self, epoch: int) -> None:
        with self._lock:
            self.epoch = epoch
            self.code_born = self._clock()
            self.code_failures = 0

    # -- internals (lock held) ----------------------------------------------------------

    def _refusal(self, address: str, now: float) -> str | None:
        p = self.policy
        if self.code_failures + self._code_in_flight >= p.code_guesses:
            return CODE_LOCKED
        src = self._sources.get(address)
        if src is None:
            return None
        self._expire(src, now)
        if src.in_flight or len(src.failures) + src.in_flight >= p.source_guesses:
            return SOURCE_LIMITED
        if now - src.last_failure < p.fail_delay:
            return SOURCE_LIMITED
        return None

    def _expire(self, src: _Source, now: float) -> None:
        while src.failures and now - src.failures[0] >= self.policy.source_window:
            src.failures.popleft()

    def _source(self, address: str) -> _Source:
        now = self._clock()
        src = self._sources.get(address)
        if src is None:
            if len(self._sources) >= MAX_SOURCES:
                self._forget_one(now)
            src = self._sources[address] = _Source()
        src.seen = now
        return src

    def _forget_one(self, now: float) -> None:
        idle = [
            (s.seen, a) for a, s in self._sources.items() if not s.connections and not s.in_flight
        ]
        if idle:
            del self._sources[min(idle)[1]]
