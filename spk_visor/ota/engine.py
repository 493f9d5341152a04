"""Node-side orchestration: check, apply, recover, status, and the detached worker.

`apply` verifies a bundle completely (root chain, manifest signatures, compatibility,
counter floor, space, every blob hash, the end of the file) into the private store before
anything on the live system changes. The heavy and risky part, staging and the swap, runs
in a detached worker (its own session, never a child of the daemon it replaces) that
inherits the OTA lock; the foreground follows the journal, so a dropped SSH session
changes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from spk_visor.errors import (
    BusyError,
    ExitCode,
    OperatorNeededError,
    VerificationError,
)
from spk_visor.ota import bundle, journal, slots, swap
from spk_visor.ota.context import OtaContext
from spk_visor.ota.roots import TrustStore
from spk_visor.ota.store import CHUNK
from spk_visor.ota.verify import check_space, verify_manifest
from spk_visor.trust import dsse, roots, verify
from spk_visor.trust.manifest import Manifest
from spk_visor.trust.verify import BlobCheck

WORKER_MODULE = "spk_visor.ota.worker"
OP = "op"  # the journal entry of the operation as a whole


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class Plan:
    """What an update would do on this node."""

    manifest_sha256: str
    version: str
    counter: int
    daemon: str  # "swap", "unchanged", "deferred", "absent"
    base: str  # "stage", "unchanged", "absent"
    downgrade: bool
    missing_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return self.daemon == "swap" or self.base == "stage"

    def to_doc(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest_sha256,
            "version": self.version,
            "counter": self.counter,
            "daemon": self.daemon,
            "base": self.base,
            "downgrade": self.downgrade,
            "download_bytes": self.missing_bytes,
            "changes": self.changes,
            "notes": self.notes,
        }


def trust_store(ctx: OtaContext) -> TrustStore:
    return TrustStore(ctx.paths.factory_root, ctx.paths.trust_dir)


def committed_base_counter(ctx: OtaContext) -> int:
    base = ctx.installed.read().get("base") or {}
    return int(base.get("counter", 0) or 0)


def make_plan(ctx: OtaContext, verified: verify.Verified) -> Plan:
    m = verified.manifest
    installed = ctx.installed.read()
    notes = list(verified.notes)
    daemon = "absent"
    if m.daemon is not None:
        current = installed.get("daemon") or {}
        if current.get("pack") == m.daemon.pack and current.get("version") == m.daemon.version:
            daemon = "unchanged"
        elif m.daemon.base_counter_min > committed_base_counter(ctx):
            daemon = "deferred"
            notes.append(
                f"daemon waits for a base with counter >= {m.daemon.base_counter_min} "
                "to be booted and committed"
            )
        else:
            daemon = "swap"
    base = "absent"
    if m.image is not None:
        current_base = installed.get("base") or {}
        base = "unchanged" if current_base.get("raw_sha256") == m.image.raw_sha256 else "stage"
    needed = needed_blobs(m, daemon, base)
    missing = ctx.store.missing(needed)
    return Plan(
        verified.sha256,
        m.release.version,
        m.release.counter,
        daemon,
        base,
        verified.downgrade,
        sum(missing.values()),
        notes,
    )


def needed_blobs(m: Manifest, daemon: str, base: str) -> dict[str, int]:
    out: dict[str, int] = {}
    if m.daemon is not None and daemon == "swap":
        out[m.daemon.pack] = m.blobs[m.daemon.pack]
    if m.image is not None and base == "stage":
        out[m.image.blob] = m.blobs[m.image.blob]
    return out


def space_needs(ctx: OtaContext, m: Manifest, plan: Plan) -> dict[Path, int]:
    needs = {ctx.paths.store: plan.missing_bytes}
    if plan.daemon == "swap" and m.daemon is not None:
        needs[ctx.paths.releases] = m.daemon.tree_size
    return needs


def check_preconditions(ctx: OtaContext) -> None:
    """Refuse while an earlier update still needs a reboot or a decision."""
    if ctx.journal.phase("base") == "trial":
        raise slots.TrialInProgress()
    if ctx.journal.phase("daemon") == "probation":
        raise BusyError(
            "a daemon release is held in probation",
            "spk-visor ota commit, or spk-visor ota rollback",
        )


@dataclass
class Verification:
    root: roots.Root
    new_roots: list[roots.Root]
    verified: verify.Verified
    plan: Plan
    start: dt.datetime


def verify_header(
    ctx: OtaContext,
    header: bundle.BundleHeader,
    *,
    mode: str,
    allow_downgrade: bool,
    assume_time: bool,
    channel: verify.Channel | None = None,
    root: roots.Root | None = None,
    new_roots: list[roots.Root] | None = None,
) -> Verification:
    """Steps 1-6 of the policy for a manifest envelope; writes nothing."""
    start = utcnow()
    floor = ctx.floor.read()
    verify.check_clock(start, str(floor.get("clock_floor", "")), assume_time)
    if root is None:
        root, new_roots = roots.chain_from_list(trust_store(ctx).load(), header.roots)
    verified = verify_manifest(header.manifest, root, start=start, channel=channel)
    verify.check_counter(
        verified,
        floor=int(floor["counter_floor"]),
        installed=ctx.installed.counter(),
        mode=mode,
        allow_downgrade=allow_downgrade,
        allow_channel_revert=ctx.config.allow_channel_revert,
    )
    plan = make_plan(ctx, verified)
    check_space(space_needs(ctx, verified.manifest, plan))
    return Verification(root, new_roots or [], verified, plan, start)


def _consume_blobs(
    ctx: OtaContext, stream: BinaryIO, m: Manifest, wanted: dict[str, int]
) -> list[str]:
    """Read every blob of the bundle, hash it, keep the wanted ones in partial/."""
    store = ctx.store
    total = sum(m.blobs.values())
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        ctx.emit("progress", {"phase": "verify", "bytes": done, "total": total})

    kept: list[str] = []
    try:
        for blob_id, size in m.blobs.items():
            if blob_id in wanted and not store.has(blob_id, size):
                store.ingest(stream, blob_id, size, progress, commit=False)
                kept.append(blob_id)
            else:
                _hash_skip(stream, blob_id, size, progress)
        bundle.expect_eof(stream)
    except BaseException:
        for blob_id in kept:
            store.discard_partial(blob_id)
        raise
    return kept


def _hash_skip(stream: BinaryIO, blob_id: str, size: int, progress: Callable[[int], None]) -> None:
    """Verify a blob we do not need to keep (already stored, or an unchanged component)."""
    check = BlobCheck(blob_id, size)
    # One reused buffer: at a GiB per bundle, a fresh bytes object per read costs ~10%.
    buf = bytearray(min(CHUNK, max(size, 1)))
    view = memoryview(buf)
    while check.remaining:
        n = stream.readinto(view[: min(len(buf), check.remaining)])  # type: ignore[attr-defined]
        if not n:
            raise VerificationError(
                f"bundle truncated: blob {blob_id[:19]}… is {check.remaining} bytes short",
                "copy the bundle again",
            )
        check.update(view[:n])
        progress(n)
    check.finish()


def persist_verified(ctx: OtaContext, v: Verification) -> None:
    """After everything checked out: new roots, the manifest, the clock floor."""
    store = trust_store(ctx)
    for root in v.new_roots:
        store.save(root)
    ctx.store.save_manifest(v.verified.sha256, v.verified.envelope.to_bytes())
    floor = ctx.floor.read()
    created = v.verified.manifest.created
    if (
        created
        and created > str(floor.get("clock_floor", ""))
        and created <= roots.format_time(v.start)
    ):
        floor["clock_floor"] = created
        ctx.floor.write(floor)


def recover_all(ctx: OtaContext) -> list[str]:
    """Finish or undo whatever a crash interrupted; idempotent."""
    actions = []
    with contextlib.suppress(FileNotFoundError):
        for entry in ctx.store.partial_dir.iterdir():
            # Partial bundle blobs are not resumable (unlike downloads, which keep .meta).
            if entry.suffix == ".part" and not entry.with_suffix(".meta").exists():
                entry.unlink()
                actions.append(f"removed unfinished blob {entry.name}")
    actions += swap.recover(ctx)
    actions += slots.recover(ctx)
    op = ctx.journal.get(OP)
    if op.get("phase") == "running" and not _alive(int(op.get("pid", 0) or 0)):
        code = _outcome(ctx)
        ctx.journal.set(OP, "done", exit_code=int(code), interrupted=True)
        ctx.history.append("interrupted", manifest=op.get("manifest"), exit_code=int(code))
        actions.append(f"the worker of {str(op.get('manifest', ''))[:12]} died; recovered")
    return actions


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (only in tests that start the worker directly) is not alive.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _outcome(ctx: OtaContext) -> ExitCode:
    """The exit code the journals add up to."""
    daemon = ctx.journal.get("daemon")
    base = ctx.journal.phase("base")
    op = ctx.journal.get(OP)
    touched_daemon = daemon.get("manifest") == op.get("manifest")
    if touched_daemon and daemon.get("phase") == "failed":
        return ExitCode.OPERATOR_NEEDED
    if touched_daemon and daemon.get("phase") == "rolled_back":
        return ExitCode.ROLLED_BACK
    if base == "failed":
        return ExitCode.OPERATOR_NEEDED
    if base == "staged":
        return ExitCode.REBOOT_REQUIRED
    if op.get("deferred"):
        return ExitCode.NOT_ELIGIBLE
    return ExitCode.OK


@dataclass
class ApplyOptions:
    mode: str = "push"
    allow_downgrade: bool = False
    assume_time: bool = False
    manual_commit: bool = False
    detach: bool = False
    apply_daemon: bool = True
    stage_base: bool = True


def apply_stream(ctx: OtaContext, stream: BinaryIO, opts: ApplyOptions) -> tuple[ExitCode, Plan]:
    """Verify a bundle from `stream` into the store, then run the update."""
    with journal.locked(ctx.paths, "apply") as lock_fd:
        recover_all(ctx)
        check_preconditions(ctx)
        header = bundle.read_header(stream)
        v = verify_header(
            ctx,
            header,
            mode=opts.mode,
            allow_downgrade=opts.allow_downgrade,
            assume_time=opts.assume_time,
        )
        plan = v.plan
        m = v.verified.manifest
        wanted = needed_blobs(m, plan.daemon, plan.base)
        kept = _consume_blobs(ctx, stream, m, wanted)
        for blob_id in kept:
            ctx.store.promote(blob_id)
        persist_verified(ctx, v)
        ctx.history.append(
            "verified",
            manifest=v.verified.sha256,
            version=m.release.version,
            counter=m.release.counter,
            keyids=sorted(v.verified.signers),
            plan=plan.to_doc(),
        )
        if not plan.changes:
            code = ExitCode.NOT_ELIGIBLE if plan.daemon == "deferred" else ExitCode.OK
            return code, plan
        proc = start_worker(ctx, plan, opts, lock_fd)
    # Our copy of the lock is closed; the worker holds it until it exits.
    if opts.detach:
        wait_started(ctx, proc, plan.manifest_sha256)
        return ExitCode.OK, plan
    return follow(ctx, proc=proc, manifest_hex=plan.manifest_sha256), plan


def worker_command(
    manifest_hex: str, lock_fd: int, flags: list[str]
) -> tuple[list[str], dict[str, str]]:
    """The worker's argv and environment.

    The worker is a new interpreter, and it must import spk_visor from where this one
    did. On a node that is not site-packages: /usr/bin/spk-visor runs `python3 -IB` and
    puts its library directory on sys.path itself (image/nodefiles.CLI_LAUNCHER), so the
    worker gets this process's sys.path as PYTHONPATH (it runs without -I)."""
    argv = [sys.executable, "-B", "-m", WORKER_MODULE, manifest_hex, "--lock-fd", str(lock_fd)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return [*argv, *flags], env


def start_worker(
    ctx: OtaContext, plan: Plan, opts: ApplyOptions, lock_fd: int
) -> subprocess.Popen[bytes]:
    """Hand the update, and the lock, to a detached worker."""
    ctx.paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = []
    if opts.manual_commit:
        flags.append("--manual-commit")
    if not opts.apply_daemon:
        flags.append("--no-daemon")
    if not opts.stage_base:
        flags.append("--no-base")
    argv, env = worker_command(plan.manifest_sha256, lock_fd, flags)
    log_fd = os.open(ctx.paths.worker_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # Own session, stdin closed, output to its own log: a dropped SSH session or the
        # restart of the daemon it replaces does not reach it. The worker writes the
        # journal itself (only one process ever writes state.json at a time).
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            pass_fds=(lock_fd,),
            close_fds=True,
            env=env,
        )
    finally:
        os.close(log_fd)
    ctx.emit("phase", {"component": "op", "phase": "started", "pid": proc.pid})
    return proc


def wait_started(
    ctx: OtaContext, proc: subprocess.Popen[bytes], manifest_hex: str, timeout: float = 120.0
) -> None:
    """Return once the detached worker has recorded its operation (or finished it).

    `apply --detach` (what a push runs) must not report a start that never happened: a
    worker that dies before its journal entry (an import error, a missing interpreter)
    would otherwise leave the journal as it was, and `status --wait` would then report
    the previous, finished operation as this one's success."""
    deadline = time.monotonic() + timeout
    while True:
        op = ctx.journal.get(OP)
        if op.get("manifest") == manifest_hex and op.get("pid") == proc.pid:
            return
        code = proc.poll()
        if code is not None:
            op = ctx.journal.get(OP)
            if op.get("manifest") == manifest_hex and op.get("pid") == proc.pid:
                return
            raise OperatorNeededError(
                f"the OTA worker exited ({code}) before it started the update",
                f"nothing was changed; see {ctx.paths.worker_log}",
            )
        if time.monotonic() > deadline:
            raise OperatorNeededError(
                f"the OTA worker (pid {proc.pid}) did not start the update in {timeout:g} s",
                "spk-visor ota status --follow",
            )
        time.sleep(0.05)


def follow(
    ctx: OtaContext,
    proc: subprocess.Popen[bytes] | None = None,
    manifest_hex: str | None = None,
    timeout: float | None = None,
    interval: float = 0.2,
) -> ExitCode:
    """Report journal phase changes until the operation is done; return its exit code.

    With `proc`/`manifest_hex`, wait for that worker's operation (the journal may still
    show the previous one for a moment); otherwise follow whatever runs now.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        doc = ctx.journal.read()
        op = doc.get(OP) or {}
        ours = manifest_hex is None or (
            op.get("manifest") == manifest_hex and (proc is None or op.get("pid") == proc.pid)
        )
        if ours:
            for component in ("base", "daemon"):
                entry = doc.get(component) or {}
                phase = str(entry.get("phase", "idle"))
                # No entry: this part was never touched (a fresh node), no phase to say.
                if (
                    entry
                    and entry.get("manifest") == op.get("manifest")
                    and seen.get(component) != phase
                ):
                    ctx.emit("phase", {"component": component, **_public(entry)})
                    seen[component] = phase
            if op.get("phase") == "done":
                return ExitCode(int(op.get("exit_code", 1)))
            if op.get("phase") != "running":
                return _outcome(ctx)
        worker_gone = (
            proc.poll() is not None
            if proc is not None
            else (not _alive(int(op.get("pid", 0) or 0)))
        )
        if worker_gone and (not ours or op.get("phase") == "running"):
            # The worker died without recording an outcome: recovery decides it.
            try:
                with journal.locked(ctx.paths, "recover"):
                    recover_all(ctx)
                    if not ours:
                        return ExitCode.INTERNAL
            except BusyError:
                pass
            continue
        if deadline is not None and time.monotonic() > deadline:
            raise OperatorNeededError(
                "the update is still running", "spk-visor ota status --follow to keep watching"
            )
        time.sleep(interval)


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("phase", "version", "target", "prev", "downtime_ms", "slot", "reason", "error")
    return {k: entry[k] for k in keys if k in entry}


def load_verified_manifest(ctx: OtaContext, manifest_hex: str) -> Manifest:
    """A manifest from the store, its signatures re-checked against the current root."""
    env = dsse.from_bytes(ctx.store.load_manifest(manifest_hex), dsse.MANIFEST_TYPE)
    if env.payload_sha256 != manifest_hex:
        raise VerificationError(f"stored manifest {manifest_hex[:12]} does not match its name")
    root = trust_store(ctx).load()
    dsse.verify(env, root.role("release"), "stored manifest")
    from spk_visor.trust import manifest as manifest_mod  # noqa: PLC0415

    return manifest_mod.parse(env.payload_json())


def run_worker(
    ctx: OtaContext,
    manifest_hex: str,
    manual_commit: bool,
    *,
    do_daemon: bool = True,
    do_base: bool = True,
) -> ExitCode:
    """The detached worker: stage the base, swap the daemon, record the outcome."""
    code = ExitCode.OK
    try:
        m = load_verified_manifest(ctx, manifest_hex)
        ctx.journal.begin(
            OP, "running", pid=os.getpid(), manifest=manifest_hex, version=m.release.version
        )
        verified = verify.Verified(m, manifest_hex, frozenset(), dsse.Envelope("", b""))
        plan = make_plan(ctx, verified)
        if plan.base == "stage" and do_base:
            code = slots.stage(ctx, m, manifest_hex)
        if plan.daemon == "swap" and do_daemon:
            if ctx.journal.phase("base") == "trial":
                raise slots.TrialInProgress()
            daemon_code = swap.run(ctx, m, manifest_hex, manual_commit=manual_commit)
            if daemon_code != ExitCode.OK:
                code = daemon_code
        elif plan.daemon == "deferred":
            ctx.journal.set(OP, "running", deferred=True)
            if code == ExitCode.OK:
                code = ExitCode.NOT_ELIGIBLE
    except Exception as e:  # the worker must always record an outcome
        code = ExitCode(getattr(e, "exit_code", ExitCode.INTERNAL))
        ctx.journal.set(
            OP, "done", exit_code=int(code), error=str(e), pid=os.getpid(), manifest=manifest_hex
        )
        ctx.history.append("failed", manifest=manifest_hex, error=str(e), exit_code=int(code))
        return code
    ctx.journal.set(OP, "done", exit_code=int(code))
    ctx.history.append("done", manifest=manifest_hex, exit_code=int(code))
    return code


def check(
    ctx: OtaContext,
    stream: BinaryIO,
    *,
    mode: str = "push",
    allow_downgrade: bool = False,
    assume_time: bool = False,
) -> Plan:
    """Every check and the plan; zero writes (no lock, no recovery, no store)."""
    header = bundle.read_header(stream)
    v = verify_header(
        ctx, header, mode=mode, allow_downgrade=allow_downgrade, assume_time=assume_time
    )
    hash_blobs(stream, v.verified.manifest)
    return v.plan


def status(ctx: OtaContext) -> dict[str, Any]:
    doc = ctx.journal.read()

    def link(path: Path) -> str | None:
        try:
            return os.readlink(path)
        except OSError:
            return None

    return {
        "daemon": doc.get("daemon") or {"phase": "idle"},
        "base": doc.get("base") or {"phase": "idle"},
        "op": doc.get(OP) or {"phase": "idle"},
        "installed": ctx.installed.read(),
        "counter_floor": ctx.floor.read()["counter_floor"],
        "current": link(ctx.paths.current),
        "previous": link(ctx.paths.previous),
        "booted_slot": slots.booted_slot(ctx),
        "lock": journal.lock_holder(ctx.paths),
    }


def hash_blobs(stream: BinaryIO, m: Manifest) -> None:
    """Check every blob of a bundle against the manifest, and the end of the file."""
    for blob_id, size in m.blobs.items():
        _hash_skip(stream, blob_id, size, lambda _n: None)
    bundle.expect_eof(stream)


def manual(ctx: OtaContext, action: str) -> ExitCode:
    """commit, rollback, discard and boot-check: under the lock, after recovery."""
    with journal.locked(ctx.paths, action):
        recovered = recover_all(ctx)
        if action == "boot-check":
            # The boot service runs boot-check alone (no `ota recover` before it): say on
            # the console what recovery did.
            for what in recovered:
                ctx.log(f"recovered: {what}")
        if action == "commit":
            return swap.commit(ctx)
        if action == "rollback":
            return swap.rollback(ctx)
        if action == "discard":
            return slots.discard(ctx)
        if action == "boot-check":
            return slots.boot_check(ctx)
    raise ValueError(action)


def verify_installed(ctx: OtaContext) -> list[str]:
    installed = ctx.installed.read()
    problems: list[str] = []
    daemon = installed.get("daemon") or {}
    if daemon.get("manifest"):
        problems += swap.verify_installed(ctx, lambda h: load_verified_manifest(ctx, h))
    base = installed.get("base") or {}
    if base.get("manifest"):
        m = load_verified_manifest(ctx, str(base["manifest"]))
        if m.image is not None:
            problems += slots.verify_installed(ctx, m.image, str(base.get("slot", "")))
    if not daemon and not base:
        problems.append("nothing was installed through OTA on this node yet")
    return problems
