"""What the deploy screens and messages say (issue 10, #14): no root, no network, no disk.

The plan refusals run through the real receiver session and the real donor session over a
socketpair channel, so the sentence tested is the one an operator reads.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.commands.deploy import _Screen
from spk_visor.deploy import channel, donor, inventory, receiver
from spk_visor.deploy.channel import SecureChannel
from spk_visor.errors import ExitCode
from spk_visor.trust import roots
from tests.support.deploy_units import SERIAL, channel_pair, fake_disk
from tests.support.ota_pki import Pki

T = 10.0
GIB = 1 << 30


@pytest.fixture
def pair() -> Iterator[tuple[SecureChannel, SecureChannel]]:
    with channel_pair(T) as ends:
        yield ends


def _refusal(
    tmp_path: Path,
    pair: tuple[SecureChannel, SecureChannel],
    monkeypatch: pytest.MonkeyPatch,
    settings: donor.Settings,
) -> tuple[donor.DeployFailed, list[tuple[str, dict[str, Any]]]]:
    """One donor session against one receiver session; the donor's failure and the
    receiver's events."""
    monkeypatch.setattr(inventory, "inventory", lambda **kw: [fake_disk()])
    pki = Pki()
    root = roots.load_anchor(pki.root_env().to_bytes(), "test root")
    events: list[tuple[str, dict[str, Any]]] = []
    options = receiver.Options(trust_root=root, mountpoint=tmp_path / "mnt", announce=False)
    r = receiver.Receiver(options, lambda e, d: events.append((e, d)))
    donor_chan, target_chan = pair
    target = threading.Thread(
        target=lambda: receiver._Session(r, target_chan, "127.0.0.1").run(), daemon=True
    )
    target.start()
    payload = donor.Payload(tmp_path / "none.spkb", {"payloadType": "x"}, "0" * 64, {}, {})
    session = donor._Session(
        donor.Target("42-K7QX9", "42", "127.0.0.1", 1, None), payload, settings, donor._Silent()
    )
    with pytest.raises(donor.DeployFailed) as caught:
        session._authenticated(donor_chan)
    target.join(timeout=T)
    return caught.value, events


@pytest.mark.parametrize(
    ("settings", "reason", "detail"),
    [
        (donor.Settings(hostname="Bad_Host"), "bad_hostname", "Bad_Host"),
        (donor.Settings(layout="simple"), "unsupported_layout", "simple"),
    ],
)
def test_a_plan_refusal_names_its_reason_once(
    tmp_path: Path,
    pair: tuple[SecureChannel, SecureChannel],
    monkeypatch: pytest.MonkeyPatch,
    settings: donor.Settings,
    reason: str,
    detail: str,
) -> None:
    """`PLAN_REFUSED bad_hostname: bad_hostname: 'Bad_Host'` said the reason twice: the
    target sent str(PlanRefused) (reason + detail) as the message, and each side put the
    reason in front of it again."""
    failure, events = _refusal(tmp_path, pair, monkeypatch, settings)
    assert failure.exit_code == ExitCode.REFUSED
    assert failure.message.count(reason) == 1, failure.message
    assert detail in failure.message
    [(_, doc)] = [(e, d) for e, d in events if e == "plan_refused"]
    line = _Screen.render("plan_refused", doc)
    assert line is not None
    assert line.count(reason) == 1 and detail in line, line


def test_a_bad_hostname_says_what_a_hostname_may_be(
    tmp_path: Path, pair: tuple[SecureChannel, SecureChannel], monkeypatch: pytest.MonkeyPatch
) -> None:
    failure, _ = _refusal(tmp_path, pair, monkeypatch, donor.Settings(hostname="Bad_Host"))
    assert "lowercase" in failure.message, failure.message


def test_the_code_screen_shows_small_disks_and_disks_without_a_model() -> None:
    """A 512 MiB disk showed as '0 GiB', and a disk without a model as '(8 GiB )'."""
    doc = {
        "code": "42-K7QX9",
        "port": 47475,
        "epoch": 0,
        "disks": [
            {"serial": "SMALL", "size": 512 << 20, "model": "USB STICK"},
            {"serial": "NOMODEL", "size": 8 * GIB, "model": ""},
            {"serial": "NONE", "size": 3 * GIB // 2, "model": None},
        ],
    }
    screen = _Screen.render("code", doc)
    assert screen is not None
    assert "SMALL (512 MiB, USB STICK)" in screen
    assert "NOMODEL (8 GiB)" in screen
    assert "NONE (1.5 GiB)" in screen
    assert "0 GiB" not in screen and " )" not in screen


def test_the_donor_lists_target_disks_in_binary_units() -> None:
    """The donor's "the target has: ..." list gave raw byte counts."""
    small = fake_disk(serial="SMALL", size=512 << 20, model="").to_doc()
    big = fake_disk(size=256 * GIB).to_doc()
    assert donor._describe_disk(small) == "SMALL (512 MiB, no model)"
    assert donor._describe_disk(big) == f"{SERIAL} (256 GiB, TEST)"


@pytest.mark.parametrize(
    ("after_hello", "wait"),
    [
        (b'{"reason": "wrong_code_wait", "retry_after": 1.5}', 1.5),
        (b'{"reason": "wrong_code_wait", "retry_after": 1e9}', 3600.0),
        (b'{"reason": "wrong_code_wait", "retry_after": NaN}', None),
        (b'{"reason": "wrong_code_wait", "retry_after": true}', None),
        (b'{"reason": "other", "retry_after": 2}', None),
        (b"[1, 2]", None),
        (b"not json", None),
        (None, None),  # a target serving another donor: the hello, then it closes
    ],
)
def test_the_busy_answer_is_read_defensively(after_hello: bytes | None, wait: float | None) -> None:
    """What follows a busy hello is unauthenticated: it is only shown, clamped, and
    anything odd is the plain "busy"."""
    a, b = socket.socketpair()
    with a, b:
        b.sendall(channel.hello_bytes(channel.FLAG_BUSY))
        if after_hello is not None:
            b.sendall(len(after_hello).to_bytes(2, "big") + after_hello)
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(channel.Busy) as caught:
            channel.donor_handshake(a, "42-K7QX9", None, None, timeout=T)
    assert caught.value.retry_after == wait
