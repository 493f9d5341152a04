"""The deploy code: format, Crockford normalisation, and what goes into the SPAKE2 password."""

from __future__ import annotations

import re

import pytest

from spk_visor.deploy import code
from spk_visor.deploy.code import CROCKFORD, Code, new_code, parse, password


def test_alphabet_is_crockford() -> None:
    assert len(CROCKFORD) == 32
    assert len(set(CROCKFORD)) == 32
    for excluded in "ILOU":
        assert excluded not in CROCKFORD


def test_new_code_shape_and_randomness() -> None:
    codes = [new_code() for _ in range(200)]
    for c in codes:
        assert re.fullmatch(r"[0-9]{2}-[0-9A-HJKMNP-TV-Z]{5}", str(c)), str(c)
        assert c.epoch == 0
        assert parse(str(c)) == (c.nameplate, c.secret)
    # 25 bits: 200 draws colliding would mean the secret is not random.
    assert len({c.secret for c in codes}) > 190


def test_new_code_keeps_nameplate_and_epoch() -> None:
    c = new_code("0423", epoch=3)
    assert (c.nameplate, c.epoch) == ("0423", 3)
    assert str(c).startswith("0423-")
    assert len(new_code(digits=4).nameplate) == 4
    with pytest.raises(ValueError, match="nameplate"):
        new_code("4a")
    with pytest.raises(ValueError, match="digits"):
        new_code(digits=6)


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("42-K7QX9", ("42", "K7QX9")),
        ("42-k7qx9", ("42", "K7QX9")),
        ("  42-k7Qx9\n", ("42", "K7QX9")),
        ("42-oO1iL", ("42", "00111")),
        ("123-ABCDE", ("123", "ABCDE")),
        ("1234-zzzzz", ("1234", "ZZZZZ")),
    ],
)
def test_parse_normalises(typed: str, expected: tuple[str, str]) -> None:
    assert parse(typed) == expected


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("42K7QX9", "no '-'"),
        ("42-K7QU9", "never contains U"),
        ("42-K7QX", "5 symbols"),
        ("42-K7QX99", "5 symbols"),
        ("42-K7*X9", "only 0-9"),
        ("4-K7QX9", "nameplate"),
        ("12345-K7QX9", "nameplate"),
        ("AB-K7QX9", "nameplate"),
        ("٤٢-K7QX9", "nameplate"),  # non-ASCII digits are digits to str.isdigit
    ],
)
def test_parse_rejects_with_clear_message(typed: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse(typed)
    # Whatever is wrong, the message shows the form to type (issue 10, #14).
    assert "NN-XXXXX" in str(caught.value)
    assert typed.strip() in str(caught.value)


def test_password_uses_normalised_code_and_epoch() -> None:
    base = password("42", "K7QX9", 0)
    # Every spelling the operator may type yields the same password.
    assert password("42", "k7qx9", 0) == base
    assert password("42", "00111", 0) == password("42", "oOIil", 0)
    # The epoch is part of it: the same secret after a rotation is a different password.
    assert password("42", "K7QX9", 1) != base
    assert password("43", "K7QX9", 0) != base
    assert password("42", "K7QX8", 0) != base
    assert b"42-K7QX9" in base and base.endswith(b":0")
    assert Code("42", "K7QX9", 0).password() == base
    with pytest.raises(ValueError):
        password("42", "K7QX9", -1)


def test_code_str_has_no_epoch() -> None:
    # The screen shows NN-SSSSS; the epoch travels in the announcement.
    assert str(Code("07", "ABCDE", 5)) == "07-ABCDE"
    assert code.SECRET_LEN == 5
