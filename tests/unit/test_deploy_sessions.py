"""Receiver and donor session logic over a socketpair channel: no root, no disk touched."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.deploy import donor, inventory, messages, receiver
from spk_visor.deploy.channel import SecureChannel
from spk_visor.errors import ExitCode
from spk_visor.trust import roots
from tests.support.deploy_units import channel_pair
from tests.support.ota_pki import Pki

T = 5.0


@pytest.fixture
def pair() -> Iterator[tuple[SecureChannel, SecureChannel]]:
    with channel_pair(T) as ends:
        yield ends


def _receiver(
    tmp_path: Path, **kw: Any
) -> tuple[receiver.Receiver, list[tuple[str, dict[str, Any]]]]:
    pki = Pki()
    root = roots.load_anchor(pki.root_env().to_bytes(), "test root")
    events: list[tuple[str, dict[str, Any]]] = []
    options = receiver.Options(trust_root=root, mountpoint=tmp_path / "mnt", announce=False, **kw)
    return receiver.Receiver(options, lambda e, d: events.append((e, d))), events


def test_unhashable_disk_serial_is_a_plan_refusal_not_an_internal_error(
    tmp_path: Path,
    pair: tuple[SecureChannel, SecureChannel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a --disk-policy, a PLAN whose disk.serial is a list used to raise TypeError
    (unhashable) in the policy lookup: an internal error that also abandoned a resumable
    install. It must be an ordinary PLAN_REFUSED."""
    monkeypatch.setattr(inventory, "inventory", lambda **kw: [])
    r, _ = _receiver(tmp_path, disk_policy=frozenset({"S1"}))
    donor_chan, target_chan = pair
    session = receiver._Session(r, target_chan, "127.0.0.1")
    session.machine.check("send", messages.HELLO)
    session.machine.check("recv", messages.PLAN)
    plan = {"manifest": {}, "disk": {"serial": ["S1"], "size": 1}, "layout": "ab",
            "hostname": "node-1"}  # fmt: skip
    assert session.accept_plan(plan) is None
    mtype, doc = donor_chan.recv_json()
    assert mtype == messages.PLAN_REFUSED
    assert doc["reason"] == "bad_plan"


def test_a_failing_reboot_command_does_not_raise(tmp_path: Path) -> None:
    """The deploy already succeeded when the donor asks for a reboot: a missing reboot
    command is reported, not turned into a failed session."""
    r, events = _receiver(tmp_path, reboot_cmd=(str(tmp_path / "no-such-reboot"),))
    r.reboot()
    assert events[0][0] == "reboot"
    assert events[-1][0] == "error" and "reboot failed" in events[-1][1]["reason"]
    # And a command that runs and succeeds is run, and reported as nothing more.
    r2, events2 = _receiver(tmp_path, reboot_cmd=(sys.executable, "-c", "pass"))
    r2.reboot()
    assert [e for e, _ in events2] == ["reboot"]


def test_a_reboot_command_that_exits_non_zero_is_reported(tmp_path: Path) -> None:
    """`reboot` refusing (exit 1: no permission, a wall message...) must not pass for a
    reboot under way: the operator would wait for a machine that never restarts."""
    argv = (sys.executable, "-c", "import sys; sys.exit('reboot: not permitted')")
    r, events = _receiver(tmp_path, reboot_cmd=argv)
    r.reboot()
    assert events[-1][0] == "error", events
    assert "reboot failed" in events[-1][1]["reason"]
    assert "not permitted" in events[-1][1]["reason"]


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b""])
def test_donor_reader_turns_a_malformed_target_message_into_a_transient_failure(
    pair: tuple[SecureChannel, SecureChannel], payload: bytes
) -> None:
    """A target record that is not a JSON object used to escape the reader thread as a
    ValueError/AttributeError (a traceback, exit 1); it is a broken channel (exit 7)."""
    donor_chan, target_chan = pair
    target = donor.Target("42-K7QX9", "42", "127.0.0.1", 1, None)
    session = donor._Session(
        target,
        None,  # type: ignore[arg-type]  # the reader never touches the payload
        donor.Settings(reply_timeout=T),
        donor._Silent(),
    )
    target_chan.send(messages.PROGRESS, payload)
    session._reader(donor_chan)
    with pytest.raises(donor.DeployFailed) as caught:
        session._next(messages.FILE_OK)
    assert caught.value.exit_code == ExitCode.TRANSIENT
    assert "JSON" in caught.value.message


def test_a_port_in_use_is_a_usage_error_not_an_internal_error(tmp_path: Path) -> None:
    """`deploy receive` on a port another process holds (a second receiver) used to end
    with "internal error: OSError: Address already in use" (exit 1): it is the operator's
    to fix, exit 2, naming the address."""
    import socket  # noqa: PLC0415

    from spk_visor.errors import SpkVisorError  # noqa: PLC0415

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        r, _ = _receiver(tmp_path, bind="127.0.0.1", port=port)
        with pytest.raises(SpkVisorError) as info:
            r.serve()
    assert info.value.exit_code == ExitCode.USAGE
    assert f"127.0.0.1:{port}" in info.value.message


class _FinishedInstaller:
    """An install whose blobs are all verified (a resumed one): finalize reports ok. Its
    unmount records whether the donor already held the REPORT when it began, waiting up
    to 3 s for it."""

    def __init__(self, report_seen: threading.Event) -> None:
        self.report_seen = report_seen
        self.unmounted_after_report: bool | None = None

    def finalize(self, *, unmount: bool = True) -> dict[str, Any]:
        if unmount:
            self.unmount()
        return {"ok": True}

    def unmount(self) -> None:
        if self.unmounted_after_report is None:
            self.unmounted_after_report = self.report_seen.wait(3.0)


def test_the_report_does_not_wait_for_the_unmount(
    tmp_path: Path, pair: tuple[SecureChannel, SecureChannel]
) -> None:
    """Everything the REPORT speaks for is durable before it is sent; unmounting the data
    partition (its last journal commit and flush) comes after it, so the donor's deploy
    ends without that wait. The unmount still happens, before the session reads REBOOT."""
    r, events = _receiver(tmp_path, reboot_cmd=(sys.executable, "-c", "pass"))
    donor_chan, target_chan = pair
    plan: dict[str, Any] = {"manifest": {}, "disk": {"serial": "S1", "size": 1},
                            "layout": "ab", "hostname": "node-1"}  # fmt: skip
    report_seen = threading.Event()
    installer = _FinishedInstaller(report_seen)
    r.journal = receiver.Journal(
        plan_digest=receiver.plan_digest(plan), manifest_sha256="0" * 64, disk_serial="S1",
        blobs={"b": 1}, installer=installer, verified={"b"},  # type: ignore[arg-type]
    )  # fmt: skip
    session = receiver._Session(r, target_chan, "127.0.0.1")
    done: list[bool] = []
    worker = threading.Thread(target=lambda: done.append(session.run()), daemon=True)
    worker.start()
    assert donor_chan.recv_json()[0] == messages.HELLO
    donor_chan.send_json(messages.PLAN, plan)
    mtype, answer = donor_chan.recv_json()
    assert (mtype, answer["resume"]) == (messages.PLAN_OK, True)
    donor_chan.send(messages.END)
    while True:
        mtype, doc = donor_chan.recv_json()
        if mtype == messages.REPORT:
            break
        assert mtype in (messages.PHASE, messages.PROGRESS), (mtype, doc)
    report_seen.set()
    assert doc["ok"] is True
    donor_chan.send(messages.REBOOT)
    worker.join(timeout=30)
    assert done == [True]
    assert installer.unmounted_after_report is True
    assert ("reboot", {"argv": [sys.executable, "-c", "pass"]}) in events
