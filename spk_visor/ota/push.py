"""Push a bundle to nodes over SSH: canary first, then a bounded fan-out (design/ota.md,
"Push mode").

Per node, one command runs on the node through `spk_visor.transport.ssh_stream`:
``<remote> ota apply --bundle - --json <apply_args>`` with the bundle streamed into its
stdin. The node verifies while it copies into its private store, hands the update to a
detached worker (its own session: a dropped SSH connection does not stop it) and follows
the worker's journal, printing NDJSON events (``{"event":"progress",...}``,
``{"event":"phase","component":"daemon","phase":"committed",...}``) and last
``{"event":"result","exit_code":N,...}``; its exit code is the outcome's (0 committed, 4
base staged, 5 rolled back...). One command and not `apply --detach` then `ota status
--wait`: the second command cost every node a session and a start of spk-visor (0.3 to
1 s on a loaded node), on the path of every wave.

The node never trusts the workstation: it runs the same checks as a pull. All this module
decides is the order (see _Rollout): the canary alone, and only if it ends with 0 or 4 the
rest, at most `parallel` applying at once; the next ones are sent the bundle, all but its
last byte, while they wait their turn. With `stop_on_failure` the first failure stops the
nodes not yet started, and cuts the bundles sent ahead short: a node refuses a truncated
bundle and keeps nothing of it.
"""

from __future__ import annotations

import dataclasses
import functools
import shlex
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from spk_visor import strict_json
from spk_visor.config import Settings, SshSpec
from spk_visor.errors import ExitCode, SpkVisorError, UsageError
from spk_visor.ota.report import clean
from spk_visor.output import Column, table
from spk_visor.transport import ssh, ssh_stream

# Outcomes after which the fan-out continues: committed, or base staged awaiting a reboot.
SUCCESS = frozenset({ExitCode.OK, ExitCode.REBOOT_REQUIRED})
# PushResult.phase for nodes this run did not start, and for failures before the node
# reported a journal phase.
SKIPPED = "skipped"
STEP_APPLY = "apply"
STEP_FOLLOW = "follow"
SKIPPED_PREFIX = "not started: "
# NodeProgress.event from the push itself: the bundle is sent ahead, but for its last byte.
WAITING: Mapping[str, Any] = {"event": "waiting"}
_T = TypeVar("_T")


# Where `spk-visor` is looked for on a node when no command is configured: the login's
# non-login PATH first (what sshd gives a command), then the places an install puts it.
# Our image installs it in its own venv under /opt/spk-visor and links /usr/bin/spk-visor
# to it; pip and pipx put it in /usr/local/bin or ~/.local/bin.
REMOTE_NAME = "spk-visor"
REMOTE_PLACES = (
    "/usr/bin/spk-visor",
    "/usr/local/bin/spk-visor",
    "/usr/sbin/spk-visor",
    "/usr/local/sbin/spk-visor",
    "/opt/spk-visor/bin/spk-visor",
    "$HOME/.local/bin/spk-visor",
)
# What a shell exits with for a command it cannot find.
NOT_FOUND = 127
STEP_FIND = "find"
SETTING_HINT = (
    "set remote_command for the node in config.toml ([nodes.NAME] remote_command = "
    '"/path/to/spk-visor"), or pass --remote-command PATH'
)


@dataclass(frozen=True)
class PushTarget:
    name: str
    ssh: SshSpec
    # The node's spk-visor command (config.toml's remote_command), or None: look for it.
    remote_command: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PushResult:
    """One node's outcome. `exit_code` uses the CLI's codes (errors.ExitCode): the node's
    own, or 7 when it could not be reached, 3 for a refused host key, 8 when skipped.
    `phase` is the node's last journal phase when it reported one, else where the push
    stopped ("skipped", "apply", "follow"). `state` is what the table shows: where each
    component the update touched ended, in words ("daemon committed, base staged in
    slot b"), or "up to date", "nothing changed", "not started". `hint` says what to do
    about a failure (None for a success or a node that was not started)."""

    node: str
    exit_code: int
    phase: str
    version: str | None
    downtime_ms: int | None
    message: str
    seconds: float
    state: str = ""
    hint: str | None = None

    @property
    def state_text(self) -> str:
        return self.state or ("not started" if self.phase == SKIPPED else self.phase)

    @property
    def ok(self) -> bool:
        return self.exit_code in SUCCESS

    def to_doc(self) -> dict[str, object]:
        """The --json form: every field, under the names above."""
        return {**dataclasses.asdict(self), "state": self.state_text}


class NodeProgress(Protocol):
    """What a progress display gets for one node, from that node's worker thread."""

    def sent(self, done: int) -> None:
        """`done` bytes of the bundle have been streamed."""

    def event(self, doc: Mapping[str, Any]) -> None:
        """The node printed this NDJSON event (progress, result, ...); or the push's own
        WAITING, when all but the last byte was sent ahead and the node waits its turn."""

    def finish(self, result: PushResult) -> None:
        """The node is done (also called for skipped nodes)."""


# Called once per node with the target and the bundle size, before anything is sent.
ProgressFactory = Callable[[PushTarget, int], NodeProgress]


class _Silent:
    def sent(self, done: int) -> None:
        pass

    def event(self, doc: Mapping[str, Any]) -> None:
        pass

    def finish(self, result: PushResult) -> None:
        pass


def no_progress(target: PushTarget, size: int) -> NodeProgress:
    return _Silent()


class _Bars:
    """A ProgressFactory drawing one tqdm bar per node on stderr, stacked in start order.
    For a terminal only; the CLI decides (--json and pipes get none)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_position = 0

    def __call__(self, target: PushTarget, size: int) -> NodeProgress:
        with self.lock:
            position = self.next_position
            self.next_position += 1
        return _Bar(target.name, size, position)


class _Bar:
    def __init__(self, name: str, size: int, position: int) -> None:
        # Imported here so that pushes without bars, and every other command, do not pay
        # for tqdm at start-up.
        from tqdm import tqdm  # noqa: PLC0415

        self.size = size
        self.done = 0
        self.bar = tqdm(
            total=size,
            desc=name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            position=position,
            leave=True,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def sent(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done
        if done >= self.size:
            self.bar.set_postfix_str("applying on the node")

    def event(self, doc: Mapping[str, Any]) -> None:
        phase = doc.get("phase")
        if doc.get("event") == "progress" and isinstance(phase, str):
            self.bar.set_postfix_str(phase, refresh=False)
        elif doc.get("event") == WAITING["event"]:
            self.bar.set_postfix_str("sent; waits for the canary or a free slot")

    def finish(self, result: PushResult) -> None:
        self.bar.set_postfix_str(f"exit {result.exit_code}: {result.phase}")
        self.bar.close()


def targets_from_settings(settings: Settings) -> list[PushTarget]:
    """The nodes of --node/--ssh/--fleet as push targets; each must be reached over SSH."""
    targets = []
    for target in settings.targets:
        if target.ssh is None:
            raise UsageError(
                f"ota push goes over SSH, and node {target.name} is reached by URL ({target.url})",
                "give the node an `ssh` in the config file, or use --ssh USER@HOST",
            )
        command = getattr(target, "remote_command", None)
        try:
            argv = tuple(shlex.split(command)) if command else None
        except ValueError as e:
            raise UsageError(
                f"remote_command of node {target.name} ({command!r}): {e}",
                "fix its quoting in the config file",
            ) from e
        targets.append(PushTarget(target.name, target.ssh, argv or None))
    if not targets:
        raise UsageError("ota push needs nodes", "use --ssh, --node or --fleet")
    return targets


def overall_exit(results: Sequence[PushResult]) -> ExitCode:
    """The CLI's exit code: the first real failure's (skipped nodes only follow one), else
    4 when any node staged a base image that waits for a reboot, else 0."""
    for result in results:
        if not result.ok and result.phase != SKIPPED:
            return _as_exit_code(result.exit_code)
    if any(result.phase == SKIPPED for result in results):
        return ExitCode.NOT_ELIGIBLE
    if any(result.exit_code == ExitCode.REBOOT_REQUIRED for result in results):
        return ExitCode.REBOOT_REQUIRED
    return ExitCode.OK


# What to do about a node's own outcome when it gave no hint (its `ota apply` prints the
# cause, not the workstation's next step).
_NEXT_STEP = {
    ExitCode.INTERNAL: "run `spk-visor ota status` on the node, and report the bug",
    ExitCode.USAGE: "check the node's OTA configuration (ota.conf, its trust root)",
    ExitCode.REFUSED: "check the bundle against the node's root: "
    "spk-visor ota verify BUNDLE --root ROOT.json; do not retry it as it is",
    ExitCode.ROLLED_BACK: "see why on the node: spk-visor ota history",
    ExitCode.BUSY: "another OTA operation runs on the node; push again when it ends",
    ExitCode.TRANSIENT: "push again to this node",
    ExitCode.NOT_ELIGIBLE: "see spk-visor ota status on the node",
    ExitCode.OPERATOR_NEEDED: "log in to the node: spk-visor ota status, then ota recover",
}


def next_step(code: int) -> str:
    """What to do about a node that ended with `code` and said nothing more."""
    try:
        return _NEXT_STEP.get(ExitCode(code), "see spk-visor ota status on the node")
    except ValueError:  # a code outside ours: a crash on the node
        return "run `spk-visor ota status` on the node"


def attention_lines(results: Sequence[PushResult]) -> list[str]:
    """One line per node that needs a person (failed, or staged a base to reboot into),
    naming it and what to do; one more for the nodes not started, if any. What `ota push`
    prints on stderr, with -q as without: cron mails it."""
    lines = []
    for r in results:
        if r.phase == SKIPPED or r.exit_code == ExitCode.OK:
            continue
        hint = r.hint or ""
        if r.exit_code == ExitCode.REBOOT_REQUIRED and "reboot" not in r.message:
            hint = "reboot the node to use it"
        line = f"{r.node}: {r.message} (exit {r.exit_code})" + (f"; {hint}" if hint else "")
        lines.append(_one_line(line))
    skipped = [r for r in results if r.phase == SKIPPED]
    if skipped:
        names = ", ".join(r.node for r in skipped)
        # "not started: WHY[; the bundle sent ahead was cut ...]": WHY is the same for all.
        why = skipped[0].message.removeprefix(SKIPPED_PREFIX).split("; ")[0]
        lines.append(
            _one_line(f"{len(skipped)} not started ({names}): {why}; fix that, push to them again")
        )
    return lines


def _one_line(text: str) -> str:
    """What a node said, over several lines or not, as one line (cron's one per node),
    its control characters shown escaped."""
    return clean(" ".join(text.split()))


def summary_table(results: Sequence[PushResult]) -> str:
    return table(
        [
            "node",
            "exit",
            "state",
            Column("version", absent="none"),
            Column("downtime", absent="n/a"),
            "time",
            "message",
        ],
        [
            [
                r.node,
                r.exit_code,
                r.state_text,
                r.version,
                None if r.downtime_ms is None else f"{r.downtime_ms} ms",
                f"{r.seconds:.1f} s",
                r.message,
            ]
            for r in results
        ],
    )


def push(
    bundle: Path,
    targets: Sequence[PushTarget],
    *,
    parallel: int = 4,
    canary: bool = True,
    stop_on_failure: bool = False,
    remote_command: Sequence[str] | None = None,
    apply_args: Sequence[str] = (),
    progress_factory: ProgressFactory | None = None,
    show_progress: bool = False,
    timeout: float,
    accept_new: bool,
    follow_timeout: float = 600,
) -> list[PushResult]:
    """Push `bundle` to `targets`; one PushResult per target, in the targets' order.

    `timeout` bounds connecting and any stall of the stream; `follow_timeout` the wait for
    `ota apply` to exit (the node's outcome) after the bundle's end was sent.
    `remote_command` runs spk-visor on every node; None: each target's own (config.toml),
    else the first found on the node (its PATH, then REMOTE_PLACES); none found is the
    node's failure (exit 2). Raises UsageError for an unreadable bundle or a bad
    `parallel`; per-node failures are results, never exceptions. Progress goes to
    `progress_factory`, or with `show_progress` to a bar per node on stderr, or nowhere.
    """
    if progress_factory is None:
        progress_factory = _Bars() if show_progress else no_progress
    if parallel < 1:
        raise UsageError(f"--parallel must be at least 1, not {parallel}")
    try:
        st = bundle.stat()
        if stat.S_ISREG(st.st_mode):  # a pipe's open would wait for a writer
            with bundle.open("rb"):
                pass
    except OSError as e:
        raise UsageError(f"cannot read the bundle {bundle}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        # Every node reads it from its start, and its size is needed first: a pipe has
        # neither. The CLI copies a pipe into a file first (spool.as_file).
        raise UsageError(
            f"the bundle {bundle} is not a regular file", "save it to a file and push that"
        )
    size = st.st_size
    node = _NodePush(
        bundle, size, remote_command, apply_args, progress_factory, timeout, accept_new,
        follow_timeout,
    )  # fmt: skip
    results: dict[int, PushResult] = {}
    pending = list(enumerate(targets))
    first = pending.pop(0) if canary and pending else None
    rollout = _Rollout(len(pending), parallel, stop_on_failure, wait_for_canary=first is not None)

    def work(k: int, target: PushTarget) -> PushResult:
        why = rollout.begin_sending(k)
        if why is not None:
            rollout.finished(k, target.name, None)
            return node.skip(target, why)
        result = node.run(target, gate=rollout.gates[k])
        rollout.finished(k, target.name, result)
        return result

    pool = ThreadPoolExecutor(
        # Up to `parallel` nodes applying and as many again sent ahead, waiting their turn.
        max_workers=max(1, min(2 * parallel, len(pending))),
        thread_name_prefix="push",
    )
    try:
        futures = [
            (index, pool.submit(work, k, target)) for k, (index, target) in enumerate(pending)
        ]
        if first is not None:
            first_index, first_target = first
            results[first_index] = verdict = node.run(first_target, on_sent=rollout.canary_sent)
            rollout.canary_done(first_target.name, verdict)
        for index, future in futures:
            results[index] = future.result()
    except BaseException:  # Ctrl-C: start nothing more, break the running streams
        rollout.stop("an interruption")
        pool.shutdown(wait=False, cancel_futures=True)
        ssh.close_all()
        raise
    pool.shutdown()
    return [results[i] for i in range(len(targets))]


class _Gate:
    """The go or stop for one node's held last byte (ssh_stream.Hold). `arrived` is called
    once, when the stream first waits here."""

    def __init__(self, arrived: Callable[[], None]) -> None:
        self._decided = threading.Event()
        self._go = False
        self._arrived: Callable[[], None] | None = arrived
        self.why = ""

    def open(self) -> None:
        self._go = True
        self._decided.set()

    def drop(self, why: str) -> None:
        self.why = why
        self._decided.set()

    @property
    def opened(self) -> bool:
        return self._go

    def wait(self, timeout: float) -> bool | None:
        arrived, self._arrived = self._arrived, None
        if arrived is not None:
            arrived()
        if not self._decided.wait(timeout):
            return None
        return self._go


class _Rollout:
    """Who may send and who may apply, for the nodes after the canary (k = 0, 1, ... in
    the targets' order).

    Sending starts once the canary's bundle is all sent (its upload runs alone, as it
    would on a rack of one), in order, at most `parallel` streams at a time. A stream
    stops one byte short and waits at its gate (ssh_stream's hold): the node has verified
    all but that byte and changed nothing. Gates open in order, only after the canary
    succeeded, while fewer than `parallel` opened nodes are unfinished. A stop (the canary
    failed; a failure under --stop-on-failure; an interruption) drops every gate not yet
    opened: those nodes see their bundle cut short and keep nothing of it.
    """

    def __init__(self, count: int, parallel: int, stop_on_failure: bool, *, wait_for_canary: bool):
        self.cond = threading.Condition()
        self.gates = [_Gate(functools.partial(self.sent, k)) for k in range(count)]
        self.parallel = parallel
        self.stop_on_failure = stop_on_failure
        self.may_send = not wait_for_canary
        self.verdict = not wait_for_canary
        self.stopped: str | None = None
        self.sending_ended = [False] * count  # its stream reached the gate, or ended
        self.finished_ = [False] * count
        self.next_send = 0  # the next node allowed to start sending
        self.sending = 0  # nodes sending their bundle ahead, not yet at their gate
        self.next_open = 0  # the next gate to open
        self.applying = 0  # opened and not finished
        self._open_more()  # with no canary to wait for, the first `parallel` may go now

    def canary_sent(self) -> None:
        with self.cond:
            self.may_send = True
            self.cond.notify_all()

    def canary_done(self, name: str, result: PushResult) -> None:
        if not result.ok:
            self.stop(f"the canary {name} failed (exit {result.exit_code})")
            return
        with self.cond:
            self.verdict = self.may_send = True
            self._open_more()
            self.cond.notify_all()

    def begin_sending(self, k: int) -> str | None:
        """Wait until node k may be contacted; the reason to skip it instead, if any."""
        with self.cond:
            self.cond.wait_for(
                lambda: (
                    self.stopped is not None
                    or (self.may_send and self.next_send == k and self.sending < self.parallel)
                )
            )
            if self.stopped is not None:
                self.next_send = max(self.next_send, k + 1)
                return self.stopped
            self.next_send += 1
            self.sending += 1
            self.cond.notify_all()
            return None

    def sent(self, k: int) -> None:
        """Node k's stream reached its gate: its sending slot is free for the next."""
        with self.cond:
            self._end_sending(k)
            self.cond.notify_all()

    def finished(self, k: int, name: str, result: PushResult | None) -> None:
        """Node k is done; None: skipped before it was contacted."""
        with self.cond:
            if result is not None:
                self._end_sending(k)
            self.finished_[k] = True
            if self.gates[k].opened:
                self.applying -= 1
            failed = result is not None and not result.ok and result.phase != SKIPPED
            if failed and self.stop_on_failure and self.stopped is None:
                self._stop(f"stopped after {name} failed (--stop-on-failure)")
            self._open_more()
            self.cond.notify_all()

    def stop(self, why: str) -> None:
        with self.cond:
            if self.stopped is None:
                self._stop(why)
            self.cond.notify_all()

    def _end_sending(self, k: int) -> None:
        if not self.sending_ended[k]:
            self.sending_ended[k] = True
            self.sending -= 1

    def _stop(self, why: str) -> None:
        self.stopped = why
        for gate in self.gates[self.next_open :]:
            gate.drop(why)

    def _open_more(self) -> None:
        while (
            self.stopped is None
            and self.verdict
            and self.applying < self.parallel
            and self.next_open < len(self.gates)
        ):
            k = self.next_open
            self.next_open += 1
            if self.finished_[k]:
                continue  # it failed while its bundle was sent ahead: nothing to open
            self.gates[k].open()
            self.applying += 1


@dataclass
class _NodePush:
    """The per-node steps, shared by the workers."""

    bundle: Path
    size: int
    remote_command: Sequence[str] | None
    apply_args: Sequence[str]
    progress_factory: ProgressFactory
    timeout: float
    accept_new: bool
    follow_timeout: float

    def skip(self, target: PushTarget, why: str) -> PushResult:
        result = PushResult(
            target.name, int(ExitCode.NOT_ELIGIBLE), SKIPPED, None, None, SKIPPED_PREFIX + why, 0.0
        )
        self.progress_factory(target, self.size).finish(result)
        return result

    def run(
        self,
        target: PushTarget,
        *,
        gate: _Gate | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> PushResult:
        """Push to one node. With `gate`, its last byte waits there (see _Rollout);
        `on_sent` is called once the whole bundle has been sent."""
        started = time.monotonic()
        display = self.progress_factory(target, self.size)
        outcome = _Outcome(step=STEP_FIND)
        try:
            command = self._command(target, outcome)
            if command is not None:
                outcome.step = STEP_APPLY
                self._apply(target, command, display, outcome, gate, on_sent)
                if outcome.cut and gate is not None:  # only a gate cuts a stream
                    result = self._cut(target, gate, outcome, time.monotonic() - started)
                    display.finish(result)
                    return result
        except SpkVisorError as e:
            outcome.exit_code = int(e.exit_code)
            outcome.message = e.message
            outcome.hint = e.hint
        result = outcome.result(target.name, time.monotonic() - started)
        display.finish(result)
        return result

    def _command(self, target: PushTarget, outcome: _Outcome) -> list[str] | None:
        """The node's spk-visor command: given, configured, or found on the node (one
        exec of sh); None (and the outcome says why) when there is none."""
        if self.remote_command is not None:
            return list(self.remote_command)
        if target.remote_command is not None:
            return list(target.remote_command)
        places = " ".join(f'"{p}"' for p in REMOTE_PLACES)
        script = (
            f'p=$(command -v {REMOTE_NAME}) && [ "${{p#/}}" != "$p" ] && {{ echo "$p"; exit 0; }}; '
            f'for c in {places}; do [ -f "$c" ] && [ -x "$c" ] && {{ echo "$c"; exit 0; }}; done; '
            f"exit {NOT_FOUND}"
        )
        done = ssh_stream.run(
            target.ssh, ["sh", "-c", script], timeout=self.timeout, accept_new=self.accept_new
        )
        found = _last_line(done.stdout)
        if done.exit_status == 0 and found.startswith("/"):
            return [found]
        tried = ", ".join([f"{REMOTE_NAME} on the login's PATH", *REMOTE_PLACES])
        outcome.exit_code = ExitCode.USAGE
        outcome.message = f"spk-visor not found on {target.name} (tried {tried}); {SETTING_HINT}"
        if done.exit_status not in (0, NOT_FOUND):
            outcome.message = (
                f"cannot look for spk-visor on {target.name}: sh exited {done.exit_status}"
                f" ({_last_line(done.stderr)}); {SETTING_HINT}"
            )
        return None

    def _cut(
        self, target: PushTarget, gate: _Gate, outcome: _Outcome, seconds: float
    ) -> PushResult:
        """The result of a node whose bundle was sent ahead and then cut short."""
        if outcome.exit_code in SUCCESS:
            # A node must refuse a truncated bundle; one that did not is broken, and may
            # have applied what it got: never report that as skipped.
            return PushResult(
                target.name, int(ExitCode.INTERNAL), STEP_APPLY, outcome.version, None,
                f"the node accepted a bundle cut {ssh_stream.HOLD_BACK} byte short "
                f"(cut because {gate.why}); check its spk-visor", round(seconds, 3),
            )  # fmt: skip
        return PushResult(
            target.name, int(ExitCode.NOT_ELIGIBLE), SKIPPED, None, None,
            f"{SKIPPED_PREFIX}{gate.why}; the bundle sent ahead was cut "
            f"{ssh_stream.HOLD_BACK} byte short, so the node applied none of it "
            f"(it exited {outcome.exit_code})", round(seconds, 3),
        )  # fmt: skip

    def _apply(
        self,
        target: PushTarget,
        command: list[str],
        display: NodeProgress,
        outcome: _Outcome,
        gate: _Gate | None,
        on_sent: Callable[[], None] | None,
    ) -> None:
        argv = [
            *command, "ota", "apply", "--bundle", "-", "--json", *self.apply_args,
        ]  # fmt: skip

        def on_line(line: str) -> None:
            doc = _json_object(line)
            if doc is None:
                return
            display.event(doc)
            outcome.event(doc)

        def sent(done: int) -> None:
            display.sent(done)
            if done >= self.size and on_sent is not None:
                on_sent()
            elif gate is not None and done == self.size - ssh_stream.HOLD_BACK:
                display.event(WAITING)

        with self.bundle.open("rb") as source:
            done = ssh_stream.exec_stream(
                target.ssh,
                argv,
                source,
                size=self.size,
                progress=sent,
                hold=gate,
                timeout=self.timeout,
                accept_new=self.accept_new,
                on_stdout_line=on_line,
                # After EOF the node finishes verifying, syncs the bundle into its store
                # (seconds per GiB on a slow disk) and follows the update to its end.
                wait_timeout=self.follow_timeout,
            )
        outcome.ended()
        outcome.cut = done.cut
        outcome.exit_code = _node_code(done.exit_status)
        if outcome.exit_code == ExitCode.OK and outcome.result_code not in (None, ExitCode.OK):
            # The process said 0 but its own result event did not: never fan out on that.
            outcome.exit_code = outcome.result_code or ExitCode.INTERNAL
        if done.exit_status == NOT_FOUND and outcome.result_code is None:
            # The node's shell could not run the command we were told to use.
            outcome.exit_code = ExitCode.USAGE
            outcome.message = (
                f"{shlex.join(command)} not found on {target.name} (exit {NOT_FOUND}); "
                "check --remote-command, or remote_command for the node in config.toml"
            )
        outcome.note_failure(done, "ota apply")


@dataclass
class _Outcome:
    """What is known so far about one node's push."""

    step: str
    exit_code: int = ExitCode.INTERNAL
    result_code: int | None = None
    phase: str | None = None
    version: str | None = None
    downtime_ms: int | None = None
    message: str = ""
    hint: str | None = None
    cut: bool = False  # the stream ended one byte short: its gate was dropped
    # The last phase event of each component: what `ota status` would show of it.
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    changed: bool | None = None  # the result event's: False when the node was up to date

    def event(self, doc: Mapping[str, Any]) -> None:
        """One NDJSON event of the node's `ota apply --json`."""
        event, component = doc.get("event"), doc.get("component")
        if event == "phase" and component == "op" and doc.get("phase") == "started":
            self.step = STEP_FOLLOW  # verified; the worker runs the update
        elif event == "phase" and component in ("daemon", "base"):
            self.components[str(component)] = dict(doc)
        elif event == "result":
            self.absorb(doc)
            self.result_code = _int(doc.get("exit_code"))
            changed = doc.get("changed")
            self.changed = changed if isinstance(changed, bool) else self.changed

    def ended(self) -> None:
        """The node's output is over: the components' end states override the result
        event's plan (its version is the target's, even when the node rolled back)."""
        self.absorb(self.components)

    def state(self) -> str:
        """Where the update left the node, in words (PushResult.state)."""
        parts = []
        for name in ("daemon", "base"):
            doc = self.components.get(name) or {}
            phase = doc.get("phase")
            # "idle" is a journal with nothing under way: it says nothing about this push.
            if not isinstance(phase, str) or phase in ("", "idle"):
                continue
            words = f"{name} {phase.replace('_', ' ')}"
            if name == "base" and isinstance(doc.get("slot"), str):
                words += f" in slot {doc['slot']}"
            parts.append(words)
        if parts:
            return ", ".join(parts)
        if self.exit_code == ExitCode.OK:
            return "up to date" if self.changed is False else "applied"
        if self.step == STEP_FOLLOW:
            return "update started; run ota status on the node"
        return "nothing changed"

    def absorb(self, doc: Mapping[str, Any]) -> None:
        """Take phase, version, downtime and message from a node's JSON (a result event,
        then the components' last phases, which override it): in each document the
        top-level keys first, then its "daemon" and "base" entries."""
        phase = _first(doc, "phase", str)
        version = _first(doc, "version", str) or _first(doc, "target_version", str)
        downtime = _first(doc, "downtime_ms", int)
        message = _first(doc, "message", str) or _first(doc, "error", str)
        self.phase = phase or self.phase
        self.version = version or self.version
        self.downtime_ms = downtime if downtime is not None else self.downtime_ms
        self.message = message or self.message

    def note_failure(self, done: ssh_stream.ExecResult, what: str) -> None:
        if done.exit_status == ssh_stream.NO_STATUS:
            self.message = f"{what} ended without an exit status (killed by a signal?)"
        elif self.exit_code != ExitCode.OK and not self.message:
            last = _last_line(done.stderr) or _last_line(done.stdout)
            self.message = last or f"{what} exited with {done.exit_status}"

    def result(self, node: str, seconds: float) -> PushResult:
        message = self.message or _describe(self.exit_code)
        hint = self.hint
        if hint is None and self.exit_code not in SUCCESS:
            hint = next_step(self.exit_code)
        return PushResult(
            node,
            int(self.exit_code),
            self.phase or self.step,
            self.version,
            self.downtime_ms,
            message,
            round(seconds, 3),
            self.state(),
            hint,
        )


def _first(doc: Mapping[str, Any], key: str, kind: type[_T]) -> _T | None:
    for scope in (doc, doc.get("daemon"), doc.get("base")):
        if isinstance(scope, Mapping):
            value = scope.get(key)
            if isinstance(value, kind) and not isinstance(value, bool):
                return value
    return None


def _node_code(status: int) -> int:
    # A command killed by a signal has no exit code; it is not a clean outcome either.
    return ExitCode.INTERNAL if status == ssh_stream.NO_STATUS else status


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        doc = strict_json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _last_line(data: bytes) -> str:
    lines = data.decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def _as_exit_code(code: int) -> ExitCode:
    try:
        return ExitCode(code)
    except ValueError:  # a node's code outside ours (a crash, a shell's 127)
        return ExitCode.INTERNAL


def _describe(code: int) -> str:
    try:
        return {
            ExitCode.OK: "done",
            ExitCode.REBOOT_REQUIRED: "base staged; reboot the node to use it",
            ExitCode.ROLLED_BACK: "failed its health checks and was rolled back",
        }.get(ExitCode(code), f"exit {code}")
    except ValueError:
        return f"exit {code}"
