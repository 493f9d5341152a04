"""Message types inside the deploy channel and the strict state machine (design/deploy.md,
"Message types"). Anything unexpected raises ChannelError; the caller then sends ERROR
(SecureChannel.send_error) and closes.

Both directions run at once (the target may acknowledge file 0 while the donor already
streams file 1), so the machine tracks each sender's stream separately and ties them
together only by causal rules of the form "S may send X once S has received Y". Each side
checks such a rule against what it has itself sent or received, which keeps the two ends'
verdicts consistent whatever the timing.
"""

from __future__ import annotations

from typing import Literal

from spk_visor.deploy.channel import ChannelError

HELLO = 1
PLAN = 2
PLAN_OK = 3
PLAN_REFUSED = 4
PHASE = 5
FILE_BEGIN = 6
DATA = 7
FILE_END = 8
FILE_OK = 9
FILE_BAD = 10
PROGRESS = 11
END = 12
REPORT = 13
REBOOT = 14
ERROR = 15
BUSY = 16

NAMES: dict[int, str] = {
    HELLO: "HELLO",
    PLAN: "PLAN",
    PLAN_OK: "PLAN_OK",
    PLAN_REFUSED: "PLAN_REFUSED",
    PHASE: "PHASE",
    FILE_BEGIN: "FILE_BEGIN",
    DATA: "DATA",
    FILE_END: "FILE_END",
    FILE_OK: "FILE_OK",
    FILE_BAD: "FILE_BAD",
    PROGRESS: "PROGRESS",
    END: "END",
    REPORT: "REPORT",
    REBOOT: "REBOOT",
    ERROR: "ERROR",
    BUSY: "BUSY",
}
# After these a FIN from the sender is an orderly close (SecureChannel keeps the same set).
CLOSING = frozenset({END, REPORT, ERROR, BUSY})

Side = Literal["donor", "target"]
Direction = Literal["send", "recv"]

# Per-sender stream states.
_T_START, _T_HELLO, _T_RUN, _T_REPORTED, _T_CLOSED = "start", "hello", "run", "reported", "closed"
_D_START, _D_PLANNED, _D_RUN, _D_FILE, _D_ENDED, _D_CLOSED = (
    "start",
    "planned",
    "run",
    "file",
    "ended",
    "closed",
)


def name(mtype: int) -> str:
    return NAMES.get(mtype, f"type {mtype}")


def refusal(reason: str, detail: str) -> str:
    """A PLAN_REFUSED for people: `reason: detail`, the reason said once.

    The machine-readable reason and the human detail travel apart; a detail that already
    starts with the reason (older targets sent `reason: detail` as the detail) is not
    prefixed again."""
    detail = detail.strip()
    if detail.startswith(f"{reason}: "):
        detail = detail[len(reason) + 2 :]
    elif detail == reason:
        detail = ""
    return f"{reason}: {detail}" if detail else reason


class StateMachine:
    """One side's view of the conversation. `check(direction, mtype)` before every send and
    after every receive; it raises ChannelError("unexpected X in state Y")."""

    def __init__(self, side: Side) -> None:
        if side not in ("donor", "target"):
            raise ValueError(f"side must be 'donor' or 'target', not {side!r}")
        self.side: Side = side
        self.donor_state = _D_START
        self.target_state = _T_START
        self.plans = 0  # PLANs the donor sent
        self.plan_answers = 0  # PLAN_OK / PLAN_REFUSED the target sent
        self.plan_ok = False
        self.files_ended = 0  # FILE_ENDs the donor sent
        self.files_answered = 0  # FILE_OK / FILE_BAD the target sent
        self.reported = False

    @property
    def state(self) -> str:
        return f"donor:{self.donor_state}/target:{self.target_state}"

    def check(self, direction: Direction, mtype: int) -> None:
        if direction not in ("send", "recv"):
            raise ValueError(f"direction must be 'send' or 'recv', not {direction!r}")
        from_target = (direction == "send") == (self.side == "target")
        ok = self._target(mtype) if from_target else self._donor(mtype)
        if not ok:
            sender = "target" if from_target else "donor"
            raise ChannelError(f"unexpected {name(mtype)} from the {sender} in state {self.state}")

    def _target(self, mtype: int) -> bool:
        st = self.target_state
        if st == _T_CLOSED:
            return False
        if mtype == ERROR:
            self.target_state = _T_CLOSED
            return True
        if st == _T_START:
            if mtype == HELLO:
                self.target_state = _T_HELLO
                return True
            if mtype == BUSY:
                self.target_state = _T_CLOSED
                return True
            return False
        if st == _T_HELLO:
            if mtype in (PLAN_OK, PLAN_REFUSED) and self.plans > self.plan_answers:
                self.plan_answers += 1
                if mtype == PLAN_OK:
                    self.plan_ok = True
                    self.target_state = _T_RUN
                return True
            return False
        if st == _T_RUN:
            if mtype in (PHASE, PROGRESS):
                return True
            if mtype in (FILE_OK, FILE_BAD) and self.files_ended > self.files_answered:
                self.files_answered += 1
                return True
            if mtype == REPORT and self.donor_state in (_D_ENDED, _D_CLOSED):
                self.reported = True
                self.target_state = _T_REPORTED
                return True
            return False
        # _T_REPORTED: the conversation is over except for an ERROR.
        return False

    def _donor(self, mtype: int) -> bool:
        st = self.donor_state
        if st == _D_CLOSED:
            return False
        if mtype == ERROR:
            self.donor_state = _D_CLOSED
            return True
        if st in (_D_START, _D_PLANNED):
            # A new PLAN only after the target's HELLO and after the last PLAN was answered
            # (refused: the target stays waiting and the operator may pick another disk).
            if (
                mtype == PLAN
                and self.target_state != _T_START
                and self.plans == self.plan_answers
                and not self.plan_ok
            ):
                self.plans += 1
                self.donor_state = _D_PLANNED
                return True
            if st == _D_PLANNED and self.plan_ok and mtype in (FILE_BEGIN, END):
                self.donor_state = _D_FILE if mtype == FILE_BEGIN else _D_ENDED
                return True
            return False
        if st == _D_RUN:
            if mtype == FILE_BEGIN:
                self.donor_state = _D_FILE
                return True
            if mtype == END:
                self.donor_state = _D_ENDED
                return True
            return False
        if st == _D_FILE:
            if mtype == DATA:
                return True
            if mtype == FILE_END:
                self.files_ended += 1
                self.donor_state = _D_RUN
                return True
            return False
        # _D_ENDED: only REBOOT, and only once the REPORT arrived.
        if mtype == REBOOT and self.reported:
            self.donor_state = _D_CLOSED
            return True
        return False
