"""The receiver's admission policy (spk_visor/deploy/guard.py) under a fake clock."""

from __future__ import annotations

import pytest

from spk_visor.deploy import guard


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _guard(**kw: float) -> tuple[guard.Guard, Clock]:
    clock = Clock()
    return guard.Guard(guard.Policy(**kw), clock), clock  # type: ignore[arg-type]


def test_connections_capped_per_source_and_in_all() -> None:
    g, _ = _guard(per_source_connections=2, max_connections=3)
    assert g.open("a") and g.open("a")
    assert not g.open("a")
    assert g.open("b")
    assert not g.open("c")  # 3 in all
    g.close("a")
    assert g.open("c")


def test_one_address_gets_three_guesses_per_window_one_at_a_time() -> None:
    g, clock = _guard(fail_delay=2.0)
    assert g.begin("a", 0)
    assert g.refusal("a") == guard.SOURCE_LIMITED  # one attempt at a time
    assert not g.begin("a", 0)
    g.end("a", wrong=True)
    assert g.refusal("a") == guard.SOURCE_LIMITED  # fail_delay
    clock.now += 2.0
    for _ in range(2):
        assert g.begin("a", 0)
        g.end("a", wrong=True)
        clock.now += 2.0
    assert g.refusal("a") == guard.SOURCE_LIMITED
    assert g.retry_after("a") == pytest.approx(600.0 - 6.0)
    assert g.refusal("b") is None  # another address is untouched
    assert not g.used_up()
    clock.now += 600.0
    assert g.refusal("a") is None


def test_code_used_up_by_many_addresses_locks_until_its_minimum_life() -> None:
    g, clock = _guard(code_guesses=4, min_code_life=120.0)
    for addr in ("a", "b", "c", "d"):
        assert g.begin(addr, 0)
    assert g.refusal("e") == guard.CODE_LOCKED  # in-flight attempts count
    for addr in ("a", "b", "c", "d"):
        g.end(addr, wrong=True)
    assert g.used_up() and not g.rotation_due()
    assert g.retry_after("e") == pytest.approx(120.0)
    clock.now += 120.0
    assert g.rotation_due()
    g.rotated(1)
    assert not g.begin("e", 0)  # an attempt against the old code
    assert g.begin("e", 1)


def test_a_failed_handshake_without_confirmation_costs_no_guess() -> None:
    g, _ = _guard()
    for _ in range(10):
        assert g.begin("a", 0)
        g.end("a", wrong=False)
    assert g.source_failures("a") == 0 and g.code_failures == 0


def test_policy_refuses_a_per_code_budget_one_address_could_use_up() -> None:
    with pytest.raises(ValueError, match="code_guesses"):
        guard.Policy(source_guesses=3, code_guesses=3)


def test_source_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard, "MAX_SOURCES", 8)
    g, _ = _guard()
    for i in range(50):
        g.begin(f"10.0.0.{i}", 0)
        g.end(f"10.0.0.{i}", wrong=False)
    assert len(g._sources) <= 8
