"""The library under `vm`, `vfio` and `reboot-uefi`, against an in-memory fake of the
daemon's client (EXAMPLES.md G.30): sizes, time budgets, console following, refusals."""

from __future__ import annotations

import io
from itertools import islice
from typing import Any

import pytest

from smechvisord import protocol as p
from spk_visor import hostops, vmops
from spk_visor.errors import DaemonError, ExitCode, RefusedError
from spk_visor.output import Console
from spk_visor.progress import waiting


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("512", 512),
        ("512M", 512),
        ("512m", 512),
        ("512MiB", 512),
        ("4G", 4096),
        ("4GiB", 4096),
        ("4gb", 4096),
        ("1.5G", 1536),
        ("1T", 1024 * 1024),
        ("2048K", 2),
        (" 8G ", 8192),
    ],
)
def test_parse_memory(text: str, mib: int) -> None:
    assert vmops.parse_memory(text) == mib


@pytest.mark.parametrize(
    "text", ["", "G", "4X", "-1G", "4 G B", "1e3", "0", "0.5M", "1000K", "512B", "4GG"]
)
def test_parse_memory_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text).replace(".", r"\.")):
        vmops.parse_memory(text)


def test_parse_memory_is_exact() -> None:
    # Floats rounded these: 10**18 + 1 came back as 10**18 (so the daemon's "got ..."
    # named another number than the one typed), and a fraction of a MiB below float
    # precision passed as a whole number.
    assert vmops.parse_memory("1000000000000000001") == 10**18 + 1
    for text in ("1.0000000000000001G", "1." + "0" * 5000 + "1G"):
        with pytest.raises(ValueError, match="whole number of MiB"):
            vmops.parse_memory(text)
    assert vmops.parse_memory("1.5" + "0" * 5000 + "G") == 1536


@pytest.mark.parametrize(
    "text", ["9" * 400, "9" * 400 + "G", "9" * 5000, "1" + "0" * 30, "99999999999999T"]
)
def test_parse_memory_refuses_absurd_sizes(text: str) -> None:
    # These were an OverflowError (float infinity), i.e. "internal error", exit 1.
    with pytest.raises(ValueError, match="too large"):
        vmops.parse_memory(text)


def test_wait_covers_the_daemons_worst_case() -> None:
    # shutdown: the graceful wait plus the three 5 s escalation steps, on top of --timeout.
    assert vmops.action_wait("shutdown", 10, 60) == 10 + 60 + 15
    assert vmops.action_wait("shutdown", 10, None) == 10 + p.DEFAULT_SHUTDOWN_TIMEOUT + 15
    assert vmops.action_wait("stop", 10) == 25
    assert vmops.action_wait("start", 10) == 20
    assert vmops.action_wait("create", 10) == 20
    assert vmops.action_wait("pause", 10) == 10
    assert hostops.reboot_budget(None) == p.DEFAULT_SHUTDOWN_TIMEOUT + 15 + 60


class FakeTarget:
    name = "alpha"


class FakeTransport:
    address = "http://alpha:8080"


class FakeClient:
    """Just enough of spk_visor.client.Client, with a serial log that grows on demand."""

    def __init__(self) -> None:
        self.target = FakeTarget()
        self.transport = FakeTransport()
        self.log = b""
        self.calls: list[tuple[str, Any]] = []
        self.vm_doc: dict[str, Any] = {"id": "web-1", "state": "stopped", "disk": "/vms/a"}
        self.support: dict[str, Any] = {"supported": True, "reason": ""}
        self.vm_list: list[dict[str, Any]] = []
        self.vfio_error: DaemonError | None = None
        # The console documents' "state" (None: a daemon that does not send it).
        self.console_state: str | None = None
        self.console_error: DaemonError | None = None

    def console(
        self, vm_id: str, offset: int | None = None, max_bytes: int | None = None
    ) -> dict[str, Any]:
        self.calls.append(("console", (offset, max_bytes)))
        if self.console_error is not None:
            raise self.console_error
        size = len(self.log)
        cap = max_bytes or 16384
        start = max(0, size - cap) if offset is None else min(offset, size)
        data = self.log[start : start + cap]
        return {
            "id": vm_id,
            "offset": start,
            "next_offset": start + len(data),
            "size": size,
            "data": data.decode("utf-8", "replace"),  # as the daemon does
            **({} if self.console_state is None else {"state": self.console_state}),
        }

    def vm(self, vm_id: str) -> dict[str, Any]:
        self.calls.append(("vm", vm_id))
        return self.vm_doc

    def delete_vm(self, vm_id: str) -> dict[str, Any]:
        self.calls.append(("delete", vm_id))
        return {"deleted": vm_id}

    def vm_action(self, vm_id: str, action: str, **kw: Any) -> dict[str, Any]:
        self.calls.append((action, kw))
        return self.vm_doc

    def set_vfio(self, enable: bool) -> dict[str, Any]:
        if self.vfio_error:
            raise self.vfio_error
        return {"enabled": enable}

    def reboot_support(self) -> dict[str, Any]:
        return self.support

    def vms(self) -> list[dict[str, Any]]:
        return self.vm_list

    def reboot_uefi(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("reboot", kw))
        return {"rebooting": True, "vms": []}


def test_console_without_follow_is_one_document() -> None:
    c = FakeClient()
    c.log = b"login: "
    docs = list(vmops.console(c, "web-1"))  # type: ignore[arg-type]
    assert [d["data"] for d in docs] == ["login: "]
    assert c.calls == [("console", (None, None))]


def test_console_follow_reads_from_the_offset_and_backs_off() -> None:
    c = FakeClient()
    c.log = b"boot\n"
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 5:
            c.log += b"login: "  # the guest speaks after five quiet polls

    docs = list(islice(vmops.console(c, "web-1", follow=True, sleep=sleep), 2))  # type: ignore[arg-type]
    assert [d["data"] for d in docs] == ["boot\n", "login: "]
    # Each poll asks from where the last one ended
    # (a little before it, to recognise the file), for as much as the daemon allows.
    offsets = [args for name, args in c.calls if name == "console"]
    assert offsets[0] == (None, None)
    assert all(o == (0, p.MAX_CONSOLE_BYTES) for o in offsets[1:])
    assert docs[1]["offset"] == 5 and docs[1]["next_offset"] == 12
    # Quiet polls back off, bounded.
    assert sleeps == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert max(sleeps) == vmops.MAX_POLL_SECONDS


@pytest.mark.parametrize(
    "new_log",
    [
        b"new\n",  # shorter than what was read
        b"[ 0.2] boot two\n",  # just as long: told apart by its content
        b"[ 0.2] boot two\nlogin: ",  # longer
    ],
)
def test_console_follow_starts_over_when_the_vmm_rewrites_the_log(new_log: bytes) -> None:
    c = FakeClient()
    c.log = b"[ 0.1] boot one\n"

    def sleep(_seconds: float) -> None:
        c.log = new_log  # the VM was rebuilt (start, reboot): File::create truncates

    docs = list(islice(vmops.console(c, "web-1", follow=True, sleep=sleep), 2))  # type: ignore[arg-type]
    assert [d["data"] for d in docs] == ["[ 0.1] boot one\n", new_log.decode()]
    assert docs[1]["offset"] == 0


def test_console_follow_overlap_is_bounded_and_skips_replaced_bytes() -> None:
    c = FakeClient()
    c.log = b"x" * 5000 + b"\xff" + b"tail"
    sleeps: list[float] = []
    gen = vmops.console(c, "web-1", follow=True, sleep=sleeps.append)  # type: ignore[arg-type]
    next(gen)
    c.log += b" more"
    assert next(gen)["data"] == " more"
    # Only "tail" (after the undecodable byte) was read again, not 1 KiB of it.
    assert c.calls[1] == ("console", (len(c.log) - 9, p.MAX_CONSOLE_BYTES))


def follow_to_the_end(c: FakeClient, sleep: Any) -> tuple[list[str], str | None]:
    """Follow c's console until the generator ends (at most 50 polls): what it yielded
    and what it returned."""
    polls: list[float] = []

    def bounded(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) > 50:
            raise AssertionError("still following after 50 polls")
        sleep(seconds)

    gen = vmops.console(c, "web-1", follow=True, sleep=bounded)  # type: ignore[arg-type]
    data = []
    while True:
        try:
            data.append(next(gen)["data"])
        except StopIteration as stop:
            return data, stop.value


def test_console_follow_ends_once_a_stopped_vm_is_read_to_the_end() -> None:
    c = FakeClient()
    c.log, c.console_state = b"boot\n", "running"
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            # The guest's last words and its stop land between two polls.
            c.log += b"reboot: Power down\n"
            c.console_state = "stopped"

    assert follow_to_the_end(c, sleep) == (["boot\n", "reboot: Power down\n"], "stopped")
    assert len(sleeps) == 2


def test_console_follow_ends_when_the_vm_is_deleted() -> None:
    c = FakeClient()
    c.log, c.console_state = b"boot\n", "running"

    def sleep(_seconds: float) -> None:
        c.console_error = DaemonError(404, p.ERR_NOT_FOUND, "no VM named 'web-1'", {}, "n1")

    assert follow_to_the_end(c, sleep) == (["boot\n"], vmops.DELETED)


def test_console_follow_other_errors_still_raise() -> None:
    c = FakeClient()
    c.log, c.console_state = b"boot\n", "running"

    def sleep(_seconds: float) -> None:
        c.console_error = DaemonError(401, "unauthorized", "bad token", {}, "n1")

    with pytest.raises(DaemonError, match="bad token"):
        follow_to_the_end(c, sleep)


@pytest.mark.parametrize(("state", "words"), [("stopped", "is stopped"), ("failed", "has failed")])
def test_console_follow_of_a_vm_that_is_not_live_is_refused_after_its_tail(
    state: str, words: str
) -> None:
    c = FakeClient()
    c.log, c.console_state = b"login: ", state

    def no_polls(_seconds: float) -> None:
        raise AssertionError("polled a VM that is not live")

    gen = vmops.console(c, "web-1", follow=True, sleep=no_polls)  # type: ignore[arg-type]
    assert next(gen)["data"] == "login: "
    with pytest.raises(RefusedError, match=f"VM web-1 {words}: there is nothing to follow"):
        next(gen)


def test_console_follow_of_an_older_daemon_keeps_following() -> None:
    c = FakeClient()
    c.log = b"boot\n"  # no "state" in its documents: only Ctrl-C ends the follow
    sleeps: list[float] = []
    docs = islice(vmops.console(c, "web-1", follow=True, sleep=sleeps.append), 1)  # type: ignore[arg-type]
    assert [d["data"] for d in docs] == ["boot\n"]
    gen = vmops.console(c, "web-1", follow=True, sleep=sleeps.append)  # type: ignore[arg-type]
    next(gen)
    c.log += b"x"
    for _ in range(8):
        c.log += b"y"
        assert next(gen)["data"] in ("xy", "y")


def test_delete_asks_then_deletes() -> None:
    c = FakeClient()
    asked: list[dict[str, Any]] = []

    def yes(vm: dict[str, Any]) -> bool:
        asked.append(vm)
        return True

    doc = vmops.delete(c, "web-1", yes)  # type: ignore[arg-type]
    assert doc == {"deleted": "web-1"}
    assert asked == [c.vm_doc]


def test_delete_declined_changes_nothing() -> None:
    c = FakeClient()
    with pytest.raises(RefusedError, match="not confirmed") as e:
        vmops.delete(c, "web-1", lambda vm: False)  # type: ignore[arg-type]
    assert e.value.exit_code == ExitCode.REFUSED
    assert ("delete", "web-1") not in c.calls


def test_delete_of_a_running_vm_is_refused_before_asking() -> None:
    c = FakeClient()
    c.vm_doc["state"] = "running"

    def never(vm: dict[str, Any]) -> bool:
        raise AssertionError("asked for a VM that cannot be deleted")

    with pytest.raises(RefusedError, match="web-1 is running"):
        vmops.delete(c, "web-1", never)  # type: ignore[arg-type]


def test_act_passes_the_longer_wait() -> None:
    c = FakeClient()
    vmops.act(c, "web-1", "shutdown", base_timeout=1, timeout_seconds=5)  # type: ignore[arg-type]
    assert c.calls == [("shutdown", {"timeout_seconds": 5, "wait": 21})]
    with pytest.raises(ValueError, match="unknown VM action"):
        vmops.act(c, "web-1", "explode", base_timeout=1)  # type: ignore[arg-type]


def test_vfio_refusal_lists_the_blockers() -> None:
    c = FakeClient()
    blockers = ["IOMMU groups are empty: enable VT-d", "no intel_iommu=on"]
    c.vfio_error = DaemonError(
        409, "iommu_not_ready", "the IOMMU is not ready", {"blockers": blockers}, "http://a"
    )
    with pytest.raises(RefusedError) as e:
        hostops.set_vfio(c, True)  # type: ignore[arg-type]
    assert e.value.exit_code == ExitCode.REFUSED
    assert e.value.message.splitlines() == [
        "http://a: vfio-pci was not loaded: the IOMMU is not ready:",
        "  - IOMMU groups are empty: enable VT-d",
        "  - no intel_iommu=on",
    ]
    assert "spk-visor iommu" in (e.value.hint or "")


def test_vfio_other_daemon_errors_pass_through() -> None:
    c = FakeClient()
    c.vfio_error = DaemonError(500, "command_failed", "modprobe failed", {}, "http://a")
    with pytest.raises(DaemonError):
        hostops.set_vfio(c, True)  # type: ignore[arg-type]


def test_reboot_unsupported_is_refused_with_the_reason_and_never_asks() -> None:
    c = FakeClient()
    c.support = {"supported": False, "reason": "legacy BIOS boot"}

    def never(plan: hostops.RebootPlan) -> bool:
        raise AssertionError("asked although the firmware cannot")

    with pytest.raises(RefusedError, match="legacy BIOS boot"):
        hostops.reboot_to_firmware_setup(c, never, timeout_seconds=None, base_timeout=10)  # type: ignore[arg-type]
    assert not [call for call in c.calls if call[0] == "reboot"]


def test_reboot_plan_names_the_live_vms_and_declining_changes_nothing() -> None:
    c = FakeClient()
    c.vm_list = [
        {"id": "web-1", "managed": True, "state": "running"},
        {"id": "old", "managed": True, "state": "stopped"},
        {"id": "pid-7", "managed": False, "state": "running"},
    ]
    plans: list[hostops.RebootPlan] = []

    def no(plan: hostops.RebootPlan) -> bool:
        plans.append(plan)
        return False

    with pytest.raises(RefusedError, match="alpha was not rebooted: not confirmed"):
        hostops.reboot_to_firmware_setup(
            c,  # type: ignore[arg-type]
            no,
            timeout_seconds=None,
            base_timeout=10,
        )
    assert plans[0].node == "alpha" and plans[0].live_vms == ["web-1"]
    assert not [call for call in c.calls if call[0] == "reboot"]


def test_reboot_confirmed_waits_long_enough() -> None:
    c = FakeClient()
    entered: list[float] = []

    class Recorder:
        def __init__(self, seconds: float) -> None:
            entered.append(seconds)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            return None

    hostops.reboot_to_firmware_setup(
        c,  # type: ignore[arg-type]
        lambda plan: True,
        timeout_seconds=5,
        base_timeout=10,
        waiting=Recorder,
    )
    assert entered == [5 + 15 + 60]
    assert c.calls == [("reboot", {"timeout_seconds": 5, "wait": 10 + 5 + 15 + 60})]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal() -> None:
    piped = io.StringIO()
    with waiting(Console(out=io.StringIO(), err=piped), "Shutting down web-1", 45):
        pass
    assert piped.getvalue() == ""

    tty = Tty()
    with waiting(Console(out=io.StringIO(), err=tty), "Shutting down web-1", 45):
        pass
    assert "Shutting down web-1" in tty.getvalue()
    assert "at most 45 s" in tty.getvalue()


@pytest.mark.parametrize("code", ["vmm_failed", "command_failed"])
def test_a_node_side_failure_is_operator_needed_not_internal(code: str) -> None:
    # A VMM that rejects the guest's image, or a modprobe that fails on the node, is not a
    # bug in spk-visor: exit 1 ("internal error") would send the operator to the wrong place.
    e = DaemonError(502, code, "cloud-hypervisor exited with code 1", {}, "http://a")
    assert e.exit_code == ExitCode.OPERATOR_NEEDED
