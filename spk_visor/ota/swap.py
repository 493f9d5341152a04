"""The daemon class: live swap under OpenRC (ota.md, "Daemon class: live swap").

    staging     unpack the pack blob into releases/.staging-<id>/, verify, fsync, chmod a-w,
                rename to releases/<id>                                 no system change
    preflight   the manifest's preflight argv, run from the staged tree
    switching   journal {prev, target} first; then stop, flip `current`, start
    probation   health URL answers the new version, `rc-service status` says started,
                the daemon's PID is stable, the optional health argv exits 0
    committed   `previous` -> the release left, floor raised, installed.json, GC
    rolling_back -> rolled_back (exit 5, manifest remembered as bad) | failed (exit 9)

Every durable step is followed by a crash point (durable.crash_point): the journal's own
("daemon:<phase>") and these, between the steps of a switch that write no journal:

    daemon:unpacked                      staging tree complete, not yet renamed
    daemon:stopped, daemon:flipped, daemon:started               the forward switch
    daemon:rollback_stopped, daemon:rollback_flipped, daemon:rollback_started
    daemon:finalized                     commit's side effects done, journal not yet

`recover` brings any of those back to a terminal journal with `current` running healthy.
It tells a power cut from a crashed worker by the kernel's boot id, recorded when the
switch begins: after a reboot it only flips `current` back (OpenRC starts the service
afterwards); in the same boot it also restarts the service, since the crashed worker may
have left it stopped or running the release being abandoned.

A release with `rollback_safe: false` (its data migrations are not expand/contract) is
never flipped back automatically once `current` named it: the update ends `failed`
(exit 9) with that release left running, and an operator decides.

Which service: the node's configuration (ota.conf `service`), not the manifest's
`service`, names the OpenRC service; the vendor cannot know what a node calls it.

Bytecode: a release tree is read-only, so the build side compiles it (checked-hash
.pyc, valid whatever mtimes staging gives) and the .pyc files are pinned by the manifest
like every other file. Nothing is compiled at stage time, so `verify_installed` checks
every byte the daemon can execute and ignores nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spk_visor import strict_json
from spk_visor.errors import (
    BusyError,
    ExitCode,
    OperatorNeededError,
    RefusedError,
    SpkVisorError,
    VerificationError,
)
from spk_visor.install import tree
from spk_visor.install.tree import release_id, rmtree, verify_tree
from spk_visor.ota import durable
from spk_visor.ota.context import OtaContext
from spk_visor.ota.nodeconf import NodePaths
from spk_visor.trust.manifest import DaemonComponent, Manifest

COMPONENT = "daemon"
# Phases in which `current` may point at a release that never passed probation.
SWITCH_PHASES = frozenset({"switching", "probation", "rolling_back"})
# Phases before any system change: an interrupted one simply did not happen.
EARLY_PHASES = frozenset({"fetching", "staging", "preflight"})
# rc-service stop may take the init script's whole retry schedule (TERM/30/KILL/5).
RC_TIMEOUT_S = 90.0
# Poll interval while waiting for the first healthy answer: it bounds how much the
# measured downtime overstates the real one.
STARTUP_POLL_S = 0.02
# How long a started daemon gets to answer its first health probe (or probation_s if
# longer): Python start-up plus imports take well under a second on a node.
STARTUP_TIMEOUT_S = 10.0
# A single probe never waits longer than this (a hung daemon must not stall probation).
PROBE_TIMEOUT_CAP_S = 2.0
MAX_HEALTH_BYTES = 64 << 10
# Probes in a row that may fail (slow answer under load) before probation fails.
MAX_CONSECUTIVE_FAILURES = 3
# How long the release we go back to gets to answer after a rollback or recovery.
ROLLBACK_HEALTH_TIMEOUT_S = 30.0
BAD_MANIFESTS_KEEP = 64
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# OpenRC's conf.d, under the OTA sysroot like every node path: the preflight and health
# commands run with the settings the service itself gets.
CONF_D = "etc/conf.d"
_RELEASE_VERSION = re.compile(r"^(.+)-[0-9a-f]{8}$")
_PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---- release ids and trees ------------------------------------------------------------


def _component(manifest: Manifest) -> DaemonComponent:
    if manifest.daemon is None:
        raise RefusedError("the manifest has no daemon component")
    return manifest.daemon


def _link_release(link: Path) -> str | None:
    """The release id a `current`/`previous` link names, or None."""
    try:
        target = os.readlink(link)
    except (FileNotFoundError, OSError):
        return None
    return Path(target).name or None


def _flip(link: Path, rid: str) -> None:
    # Relative, so the tree stays valid wherever the sysroot is mounted.
    durable.flip_symlink(link, f"releases/{rid}")


def _stage_tree(ctx: OtaContext, component: DaemonComponent, rid: str) -> Path:
    releases = ctx.paths.releases
    releases.mkdir(parents=True, exist_ok=True, mode=0o755)
    final = releases / rid
    if final.exists() or final.is_symlink():
        problems = verify_tree(final, component)
        if not problems:
            ctx.log(f"release {rid} is already staged and verifies")
            return final
        if rid in (_link_release(ctx.paths.current), _link_release(ctx.paths.previous)):
            raise OperatorNeededError(
                f"release {rid} is in use and differs from its manifest: {problems[0]}",
                "run spk-visor ota verify-installed and reinstall the release",
            )
        ctx.log(f"release {rid} is damaged ({problems[0]}); staging it again")
        rmtree(final)
    return tree.stage(
        releases,
        rid,
        ctx.store.path(component.pack),
        component,
        lambda: durable.crash_point("daemon:unpacked"),
    )


# ---- the service ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Service:
    argv: tuple[str, ...]
    name: str

    def _rc(self, action: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*self.argv, self.name, action],
                check=False,
                capture_output=True,
                text=True,
                timeout=RC_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return subprocess.CompletedProcess([self.name, action], 1, "", str(e))

    def stop(self) -> subprocess.CompletedProcess[str]:
        return self._rc("stop")

    def start(self) -> subprocess.CompletedProcess[str]:
        return self._rc("start")

    def running(self) -> bool:
        # openrc-run status: 0 started, 3 stopped, other codes crashed/inactive/...
        return self._rc("status").returncode == 0


def _service(ctx: OtaContext) -> _Service:
    return _Service(ctx.config.rc_service, ctx.config.service)


def _why(result: subprocess.CompletedProcess[str]) -> str:
    text = (result.stderr or result.stdout or "").strip().splitlines()
    return f"exit {result.returncode}" + (f": {text[-1]}" if text else "")


def _service_env(paths: NodePaths, service: str) -> dict[str, str]:
    """The environment the service's daemon gets: literal SMECHVISORD_* assignments of
    <sysroot>/etc/conf.d/<service> (a value needing a shell to expand is left out)."""
    env = {"PATH": _PATH_ENV, "LANG": "C.UTF-8"}
    try:
        text = (paths.sysroot / CONF_D / service).read_text(errors="replace")
    except OSError:
        return env
    for line in text.splitlines():
        match = re.match(r"^\s*(?:export\s+)?(SMECHVISORD_[A-Z0-9_]+)=(.*?)\s*$", line)
        if not match or match.group(1) in ("SMECHVISORD_BIN", "SMECHVISORD_LOG"):
            continue
        name, raw = match.groups()
        single = raw[:1] == raw[-1:] == "'" and "'" not in raw[1:-1]
        double = raw[:1] == raw[-1:] == '"' and not re.search(r'[$`\\"]', raw[1:-1])
        if len(raw) >= 2 and (single or double):
            env[name] = raw[1:-1]
        elif re.fullmatch(r"[A-Za-z0-9_./:,+@%=-]*", raw):
            env[name] = raw
    return env


def _run_tree_command(
    release: Path, argv: tuple[str, ...] | list[str], timeout: float, env: dict[str, str]
) -> str | None:
    """Run `argv` (argv[0] relative to the release) from the release; None when it exits 0."""
    try:
        result = subprocess.run(
            [str(release / argv[0]), *argv[1:]],
            cwd=release,
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return f"{argv[0]} did not finish within {timeout:g} s"
    except OSError as e:
        return f"{argv[0]}: {e.strerror}"
    return None if result.returncode == 0 else f"{argv[0]} {_why(result)}"


# ---- health -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    ok: bool
    reason: str = ""
    pid: int | None = None
    # A wrong answer (not a slow or missing one): no point in probing again.
    fatal: bool = False


# Loopback health checks must not go through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe(url: str, version: str | None, timeout: float) -> Probe:
    """One GET of the health URL: 200, JSON, and `version` when one is expected."""
    try:
        with _OPENER.open(url, timeout=min(timeout, PROBE_TIMEOUT_CAP_S)) as r:
            status = r.status
            body = r.read(MAX_HEALTH_BYTES + 1)
    except urllib.error.HTTPError as e:
        return Probe(False, f"health answered HTTP {e.code}")
    except (OSError, urllib.error.URLError) as e:
        return Probe(False, f"health unreachable: {getattr(e, 'reason', e)}")
    if status != 200 or len(body) > MAX_HEALTH_BYTES:
        return Probe(False, f"health answered HTTP {status}")
    try:
        doc = strict_json.loads(body)
    except ValueError:
        return Probe(False, "health answer is not JSON", fatal=True)
    if not isinstance(doc, dict):
        return Probe(False, "health answer is not a JSON object", fatal=True)
    pid = doc.get("pid")
    pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
    if version is not None and doc.get("version") != version:
        return Probe(False, f"health reports version {doc.get('version')!r}, want {version!r}",
                     pid, fatal=True)  # fmt: skip
    return Probe(True, pid=pid)


def _wait_healthy(url: str, version: str | None, timeout: float) -> Probe:
    """Poll until healthy, a wrong answer, or `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe(url, version, timeout=1.0)
        if result.ok or result.fatal or time.monotonic() >= deadline:
            return result
        time.sleep(STARTUP_POLL_S)


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


# ---- journal helpers ------------------------------------------------------------------


def _phase(ctx: OtaContext, phase: str, **fields: Any) -> dict[str, Any]:
    entry = ctx.journal.set(COMPONENT, phase, **fields)
    ctx.emit("phase", {"component": COMPONENT, "phase": phase})
    return entry


def _remember_bad(ctx: OtaContext, manifest_hex: str | None) -> None:
    if not manifest_hex:
        return
    doc = ctx.floor.read()
    bad = [m for m in doc["bad_manifests"] if m != manifest_hex]
    doc["bad_manifests"] = [*bad, manifest_hex][-BAD_MANIFESTS_KEEP:]
    ctx.floor.write(doc)


def _release_version(ctx: OtaContext, rid: str | None) -> str | None:
    """The version a release reports, from installed.json or else from its id."""
    if rid is None:
        return None
    daemon = ctx.installed.read().get("daemon") or {}
    for entry in (daemon, daemon.get("previous") or {}):
        if isinstance(entry, dict) and entry.get("release") == rid and entry.get("version"):
            return str(entry["version"])
    match = _RELEASE_VERSION.match(rid)
    return match.group(1) if match else None


def _begin(ctx: OtaContext, manifest: Manifest, manifest_hex: str, **fields: Any) -> None:
    component = _component(manifest)
    health = component.health
    info = {
        "manifest": manifest_hex,
        "release": release_id(component, manifest_hex),
        "version": component.version,
        "counter": manifest.release.counter,
        "set_floor": manifest.release.set_floor,
        "pack": component.pack,
        "rollback_safe": component.rollback_safe,
        "health": {
            "argv": list(health.argv),
            "timeout_s": health.timeout_s,
            "probation_s": health.probation_s,
            "interval_s": health.interval_s,
            "max_pid_changes": health.max_pid_changes,
        },
        **fields,
    }
    entry = ctx.journal.get(COMPONENT)
    if entry.get("manifest") == manifest_hex and entry.get("phase") != "committed":
        # The same update again (after an interruption): keep counting transitions, so
        # a release that keeps killing its worker trips the loop breaker.
        _phase(ctx, "staging", **info)
    else:
        ctx.journal.begin(COMPONENT, "staging", **info)
        ctx.emit("phase", {"component": COMPONENT, "phase": "staging"})
    if ctx.journal.over_budget(COMPONENT):
        _phase(ctx, "failed", reason="too many attempts (loop breaker)")
        raise OperatorNeededError(
            f"the daemon update {manifest_hex[:12]} was attempted too often",
            "inspect spk-visor ota history",
        )


# ---- staging and the full run -------------------------------------------------------


def stage(ctx: OtaContext, manifest: Manifest, manifest_hex: str) -> Path:
    """Journal `staging` and stage the release; returns releases/<id>. No system change."""
    component = _component(manifest)
    _begin(ctx, manifest, manifest_hex)
    return _stage_tree(ctx, component, release_id(component, manifest_hex))


def run(
    ctx: OtaContext, manifest: Manifest, manifest_hex: str, *, manual_commit: bool = False
) -> ExitCode:
    """The whole live swap, inside the worker that holds the OTA lock.

    Raises the SpkVisorError of a staging problem (VerificationError: the store's pack does
    not match the manifest) after journalling `idle`; everything after staging ends in a
    terminal phase (or a healthy probation held for `commit`) and returns its exit code.
    """
    component = _component(manifest)
    rid = release_id(component, manifest_hex)
    if ctx.journal.phase(COMPONENT) in SWITCH_PHASES:
        raise BusyError(
            "a daemon update is still in probation or being switched",
            "commit or roll it back first (spk-visor ota commit|rollback)",
        )
    if _link_release(ctx.paths.current) == rid:
        ctx.log(f"release {rid} is already current")
        return ExitCode.OK
    try:
        release = stage(ctx, manifest, manifest_hex)
    except OperatorNeededError as e:
        ctx.log(e.message)
        return ExitCode.OPERATOR_NEEDED
    except SpkVisorError as e:
        _phase(ctx, "idle", error=e.message)
        ctx.history.append("daemon_stage_failed", manifest=manifest_hex, error=e.message)
        raise
    _phase(ctx, "preflight", manual_commit=manual_commit)
    if component.preflight is not None:
        pre = component.preflight
        env = _service_env(ctx.paths, ctx.config.service)
        failure = _run_tree_command(release, pre.argv, pre.timeout_s, env)
        if failure:
            reason = f"preflight failed: {failure}"
            _remember_bad(ctx, manifest_hex)
            _phase(ctx, "rolled_back", reason=reason)
            ctx.history.append("daemon_rolled_back", manifest=manifest_hex, reason=reason)
            ctx.log(reason)
            return ExitCode.ROLLED_BACK
    prev = _link_release(ctx.paths.current)
    entry = _phase(
        ctx,
        "switching",
        prev=prev,
        prev_version=_release_version(ctx, prev),
        target=rid,
        boot_id=_boot_id(),
    )
    return _switch(ctx, entry, manual_commit=manual_commit)


def _switch(ctx: OtaContext, entry: dict[str, Any], *, manual_commit: bool) -> ExitCode:
    svc = _service(ctx)
    url = ctx.config.health_url
    health = entry["health"]
    probation_s = ctx.config.probation_s or float(health["probation_s"])
    # Downtime starts just before stop and ends at the first healthy answer.
    t_stop = time.monotonic()
    result = svc.stop()
    durable.crash_point("daemon:stopped")
    t_stopped = time.monotonic()
    if result.returncode != 0:
        return _roll_back(ctx, entry, f"rc-service stop failed: {_why(result)}")
    _flip(ctx.paths.current, entry["target"])
    durable.crash_point("daemon:flipped")
    t_flipped = time.monotonic()
    result = svc.start()
    durable.crash_point("daemon:started")
    t_started = time.monotonic()
    if result.returncode != 0:
        return _roll_back(ctx, entry, f"rc-service start failed: {_why(result)}")
    first = _wait_healthy(url, entry["version"], max(probation_s, STARTUP_TIMEOUT_S))
    t_healthy = time.monotonic()
    if not first.ok:
        return _roll_back(ctx, entry, f"never healthy: {first.reason}")
    timings = {
        "stop_ms": round((t_stopped - t_stop) * 1000),
        "flip_ms": round((t_flipped - t_stopped) * 1000),
        "start_ms": round((t_started - t_flipped) * 1000),
        "first_healthy_ms": round((t_healthy - t_started) * 1000),
    }
    downtime_ms = round((t_healthy - t_stop) * 1000)
    entry = _phase(ctx, "probation", downtime_ms=downtime_ms, timings=timings)
    ctx.history.append(
        "daemon_switched",
        manifest=entry["manifest"],
        release=entry["target"],
        downtime_ms=downtime_ms,
        **timings,
    )
    ctx.log(f"daemon {entry['version']} answered after {downtime_ms} ms of downtime")
    failure = _probation(ctx, svc, entry, first, probation_s)
    if failure:
        return _roll_back(ctx, entry, failure)
    if manual_commit:
        _phase(ctx, "probation", awaiting_commit=True)
        ctx.history.append("daemon_awaiting_commit", manifest=entry["manifest"])
        ctx.log("healthy; held in probation until `spk-visor ota commit`")
        return ExitCode.OK
    return _commit(ctx)


def _probation(
    ctx: OtaContext, svc: _Service, entry: dict[str, Any], first: Probe, probation_s: float
) -> str | None:
    """Watch the new daemon for `probation_s` seconds; the reason it failed, or None."""
    health = entry["health"]
    interval = float(health["interval_s"])
    timeout = float(health["timeout_s"])
    release = ctx.paths.releases / entry["target"]
    last_pid = first.pid
    pid_changes = 0
    failures = 0
    end = time.monotonic() + probation_s
    while True:
        now = time.monotonic()
        if now >= end and failures == 0:
            return None
        time.sleep(max(0.0, min(interval, end - now)) if failures == 0 else interval)
        result = probe(ctx.config.health_url, entry["version"], timeout)
        if result.fatal:
            return result.reason
        if not svc.running():
            return f"rc-service status: {svc.name} is not started"
        if result.ok and health["argv"]:
            env = _service_env(ctx.paths, svc.name)
            failure = _run_tree_command(release, health["argv"], timeout, env)
            if failure:
                result = Probe(False, f"health check {failure}")
        if not result.ok:
            failures += 1
            if failures >= MAX_CONSECUTIVE_FAILURES:
                return f"{failures} failed probes in a row: {result.reason}"
            continue
        failures = 0
        if result.pid is not None and last_pid is not None and result.pid != last_pid:
            pid_changes += 1
            if pid_changes > int(health["max_pid_changes"]):
                return f"the daemon restarted {pid_changes} times (PID {last_pid} -> {result.pid})"
        last_pid = result.pid if result.pid is not None else last_pid


# ---- commit ---------------------------------------------------------------------------


def _commit(ctx: OtaContext) -> ExitCode:
    entry = _phase(ctx, "committed")
    _finalize(ctx, entry)
    return ExitCode.OK


def _finalize(ctx: OtaContext, entry: dict[str, Any]) -> list[str]:
    """Commit's side effects, each idempotent: `previous`, floor, installed.json, GC."""
    actions: list[str] = []
    target, prev = entry["target"], entry.get("prev")
    if prev and prev != target and _link_release(ctx.paths.previous) != prev:
        _flip(ctx.paths.previous, prev)
        actions.append(f"previous -> {prev}")
    ctx.floor.raise_to(int(entry.get("set_floor", 0)))
    installed = ctx.installed.read().get("daemon") or {}
    if installed.get("manifest") != entry["manifest"]:
        left = {k: v for k, v in installed.items() if k != "previous"} or None
        record = {
            "release": target,
            "manifest": entry["manifest"],
            "pack": entry.get("pack"),
            "version": entry["version"],
            "counter": int(entry.get("counter", 0)),
            "previous": left if left and left.get("release") == prev else _bare(prev),
        }
        ctx.installed.record(
            COMPONENT, record, entry["manifest"], int(entry.get("counter", 0)), entry["version"]
        )
        actions.append(f"installed {target}")
    actions += [f"removed release {name}" for name in _gc(ctx)]
    durable.crash_point("daemon:finalized")
    if not entry.get("finalized"):
        _phase(ctx, "committed", finalized=True)
        ctx.history.append(
            "daemon_committed",
            manifest=entry["manifest"],
            release=target,
            version=entry["version"],
            downtime_ms=entry.get("downtime_ms"),
        )
        ctx.log(f"daemon {entry['version']} committed")
    return actions


def _bare(rid: str | None) -> dict[str, Any] | None:
    # A release that was never installed through OTA (factory install): no counter known.
    return {"release": rid, "counter": 0} if rid else None


def _gc(ctx: OtaContext) -> list[str]:
    """Remove releases other than `current` and `previous`."""
    keep = {_link_release(ctx.paths.current), _link_release(ctx.paths.previous)}
    removed = []
    if ctx.paths.releases.is_dir():
        for path in sorted(ctx.paths.releases.iterdir()):
            if not path.name.startswith(".") and path.name not in keep:
                rmtree(path)
                removed.append(path.name)
    if removed:
        durable.fsync_dir(ctx.paths.releases)
    return removed


def commit(ctx: OtaContext) -> ExitCode:
    """Commit a release held in probation by --manual-commit (probed once more first)."""
    entry = ctx.journal.get(COMPONENT)
    if entry.get("phase") != "probation" or not entry.get("awaiting_commit"):
        raise RefusedError("no daemon release is waiting for a commit", "see spk-visor ota status")
    result = probe(ctx.config.health_url, entry["version"], float(entry["health"]["timeout_s"]))
    if result.ok and not _service(ctx).running():
        result = Probe(False, f"rc-service status: {ctx.config.service} is not started")
    if not result.ok:
        return _roll_back(ctx, entry, f"unhealthy at commit: {result.reason}")
    return _commit(ctx)


# ---- rollback -------------------------------------------------------------------------


def _go_back(ctx: OtaContext, svc: _Service, prev: str | None, prev_version: str | None,
             *, restart: bool = True, prefix: str = "daemon:rollback_") -> Probe:  # fmt: skip
    """Stop, point `current` back at `prev` (or remove it), start, wait until healthy."""
    if restart:
        result = svc.stop()
        if result.returncode != 0:
            ctx.log(f"rc-service stop during rollback: {_why(result)}")
    durable.crash_point(f"{prefix}stopped")
    if prev:
        if _link_release(ctx.paths.current) != prev:
            _flip(ctx.paths.current, prev)
    else:
        with contextlib.suppress(FileNotFoundError):
            ctx.paths.current.unlink()
            durable.fsync_dir(ctx.paths.current.parent)
    durable.crash_point(f"{prefix}flipped")
    if not prev:
        return Probe(False, "there is no previous release to go back to")
    if not restart:
        return Probe(True)
    result = svc.start()
    durable.crash_point(f"{prefix}started")
    if result.returncode != 0:
        return Probe(False, f"rc-service start failed: {_why(result)}")
    return _wait_healthy(ctx.config.health_url, prev_version, ROLLBACK_HEALTH_TIMEOUT_S)


def _roll_back(ctx: OtaContext, entry: dict[str, Any], reason: str) -> ExitCode:
    """Automatic rollback after a failed switch or probation: exit 5, or 9 if it fails."""
    if _migrated(ctx, entry):
        return _hold_unsafe(ctx, entry, reason)
    ctx.log(f"rolling back: {reason}")
    entry = _phase(ctx, "rolling_back", reason=reason)
    back = _go_back(ctx, _service(ctx), entry.get("prev"), entry.get("prev_version"))
    return _settle(ctx, entry, reason, back)


def _migrated(ctx: OtaContext, entry: dict[str, Any]) -> bool:
    """Whether a release that cannot be rolled back (rollback_safe: false, its data
    migrations are not expand/contract) may have run: once `current` names it, it may."""
    return entry.get("rollback_safe") is False and (
        _link_release(ctx.paths.current) == entry.get("target")
    )


def _hold_unsafe(ctx: OtaContext, entry: dict[str, Any], reason: str) -> ExitCode:
    """No automatic rollback past a one-way migration: leave the release, ask a person."""
    why = f"{reason}; not rolled back: the release is not rollback-safe (data migrated)"
    _phase(ctx, "failed", reason=why)
    ctx.history.append("daemon_failed", manifest=entry.get("manifest"), reason=why)
    ctx.log(why)
    return ExitCode.OPERATOR_NEEDED


def _settle(ctx: OtaContext, entry: dict[str, Any], reason: str, back: Probe) -> ExitCode:
    if back.ok and not ctx.journal.over_budget(COMPONENT):
        _remember_bad(ctx, entry.get("manifest"))
        _phase(ctx, "rolled_back", reason=reason)
        ctx.history.append(
            "daemon_rolled_back",
            manifest=entry.get("manifest"),
            release=entry.get("prev"),
            reason=reason,
            downtime_ms=entry.get("downtime_ms"),
        )
        return ExitCode.ROLLED_BACK
    why = back.reason if not back.ok else "too many attempts (loop breaker)"
    _phase(ctx, "failed", reason=f"{reason}; rollback failed: {why}")
    ctx.history.append("daemon_failed", manifest=entry.get("manifest"), reason=reason, rollback=why)
    ctx.log(f"rollback failed: {why}")
    return ExitCode.OPERATOR_NEEDED


def rollback(ctx: OtaContext) -> ExitCode:
    """Manual rollback to `previous` (never below the counter floor).

    A release held in probation is rolled back like a failed probation. Otherwise the
    releases swap places: `current` <- previous, `previous` <- the release left, whose
    manifest is remembered as bad so a cron pull does not reapply it. If the previous
    release does not come up healthy, the release left is restored (exit 9).
    """
    entry = ctx.journal.get(COMPONENT)
    if entry.get("phase") == "probation" and entry.get("awaiting_commit"):
        code = _roll_back(ctx, entry, "manual rollback")
        return ExitCode.OK if code == ExitCode.ROLLED_BACK else code
    if entry.get("phase") in SWITCH_PHASES:
        raise RefusedError("a daemon update is in progress", "run spk-visor ota recover")
    current = _link_release(ctx.paths.current)
    previous = _link_release(ctx.paths.previous)
    if not previous or previous == current or not (ctx.paths.releases / previous).is_dir():
        raise RefusedError("there is no previous daemon release to roll back to")
    installed = ctx.installed.read().get("daemon") or {}
    target_info = installed.get("previous") or _bare(previous) or {}
    if target_info.get("release") != previous:
        target_info = _bare(previous) or {}
    floor = int(ctx.floor.read()["counter_floor"])
    counter = int(target_info.get("counter", 0) or 0)
    if counter < floor:
        raise VerificationError(
            f"the previous release {previous} (counter {counter}) is below the node's "
            f"counter floor {floor}",
            "a release below the floor cannot be reinstated",
        )
    left = {k: v for k, v in installed.items() if k != "previous"}
    # `target` is the release being left, as in a forward switch that recovery undoes.
    ctx.journal.begin(
        COMPONENT,
        "rolling_back",
        manual=True,
        reason="manual rollback",
        manifest=left.get("manifest"),
        version=_release_version(ctx, current),
        target=current,
        to=previous,
        to_version=target_info.get("version") or _release_version(ctx, previous),
        boot_id=_boot_id(),
    )
    svc = _service(ctx)
    back = _go_back(ctx, svc, previous, target_info.get("version") or None)
    if not back.ok:
        # The release we left was healthy: put it back rather than leave nothing running.
        restored = _go_back(
            ctx, svc, current, _release_version(ctx, current), prefix="daemon:restore_"
        )
        _phase(ctx, "failed" if not restored.ok else "committed",
               reason=f"manual rollback failed: {back.reason}", finalized=True)  # fmt: skip
        ctx.history.append("daemon_rollback_failed", release=previous, reason=back.reason)
        return ExitCode.OPERATOR_NEEDED
    if current:
        _flip(ctx.paths.previous, current)
    _remember_bad(ctx, left.get("manifest"))
    if target_info.get("manifest"):
        ctx.installed.record(
            COMPONENT,
            {**target_info, "previous": left or _bare(current)},
            str(target_info["manifest"]),
            counter,
            str(target_info.get("version", "")),
        )
    _phase(ctx, "rolled_back", finalized=True)
    ctx.history.append("daemon_rolled_back", release=previous, reason="manual rollback")
    return ExitCode.OK


# ---- recovery ----------------------------------------------------------------------------


def recover(ctx: OtaContext) -> list[str]:
    """Bring an interrupted daemon update to a terminal state; the actions taken.

    Idempotent: with nothing interrupted it returns [] and writes nothing.
    """
    actions: list[str] = []
    releases = ctx.paths.releases
    if releases.is_dir():
        for staging in sorted(releases.glob(f"{tree.STAGING_PREFIX}*")):
            rmtree(staging)
            actions.append(f"removed {staging.name}")
    for link in (ctx.paths.current, ctx.paths.previous):
        tmp = link.with_name(link.name + ".tmp")
        if tmp.is_symlink():
            tmp.unlink()
            actions.append(f"removed {tmp.name}")
    entry = ctx.journal.get(COMPONENT)
    phase = entry.get("phase", "idle")
    if phase in EARLY_PHASES:
        _phase(ctx, "idle", interrupted=phase)
        ctx.history.append("daemon_interrupted", manifest=entry.get("manifest"), phase=phase)
        actions.append(f"{phase} interrupted before any change: journal idle")
    elif phase in SWITCH_PHASES:
        actions += _recover_switch(ctx, entry)
    elif phase == "committed" and not entry.get("finalized"):
        actions += ["finished the commit", *_finalize(ctx, entry)]
    return actions


def _recover_switch(ctx: OtaContext, entry: dict[str, Any]) -> list[str]:
    svc = _service(ctx)
    running = svc.running()
    held = entry.get("phase") == "probation" and entry.get("awaiting_commit") and running
    if held and probe(ctx.config.health_url, entry.get("version"), 2.0).ok:
        # Held for `commit` and still healthy: the operator's decision, not a crash.
        return []
    if not entry.get("manual") and _migrated(ctx, entry):
        _hold_unsafe(ctx, entry, f"interrupted in {entry.get('phase')}")
        return ["journal failed (not rollback-safe)"]
    if entry.get("manual"):
        # An interrupted manual rollback: back to the release it was leaving, which was
        # committed and healthy (the operator can ask again).
        back_to, back_version = entry.get("target"), entry.get("version")
        other_version = entry.get("to_version")
    else:
        back_to, back_version = entry.get("prev"), entry.get("prev_version")
        other_version = entry.get("version")
    actions = []
    if _link_release(ctx.paths.current) != back_to:
        actions.append(f"current -> {back_to}" if back_to else "removed current")
    same_boot = bool(entry.get("boot_id")) and entry.get("boot_id") == _boot_id()
    if running and back_version and back_version != other_version:
        # The worker may have died before it stopped the old daemon (or after starting
        # it again in a rollback): then leave it be.
        # One probe: a daemon still starting gets restarted, which is merely slower.
        restart = not probe(ctx.config.health_url, back_version, 2.0).ok
    else:
        # Not running in the same boot: the dead worker had stopped it. After a reboot,
        # OpenRC starts the service after this recovery.
        restart = running or same_boot
    if restart:
        actions.append(f"restarted {svc.name}")
    back = _go_back(ctx, svc, back_to, back_version, restart=restart, prefix="daemon:recover_")
    reason = f"interrupted in {entry.get('phase')}"
    if entry.get("manual"):
        ok = back.ok
        _phase(ctx, "committed" if ok else "failed", reason=f"manual rollback {reason}",
               finalized=True)  # fmt: skip
        ctx.history.append("daemon_rollback_interrupted", release=back_to, restored=ok)
        actions.append("journal committed" if ok else "journal failed")
        return actions
    code = _settle(ctx, entry, reason, back)
    actions.append("journal rolled_back" if code == ExitCode.ROLLED_BACK else "journal failed")
    return actions


# ---- verification of the installed tree ---------------------------------------------------


def verify_installed(ctx: OtaContext, load_manifest: Callable[[str], Manifest]) -> list[str]:
    """Re-hash the current release against its manifest; [] when everything matches.

    `load_manifest(hex)` returns the verified, parsed manifest stored for that hash (the
    engine reads store/manifests/<hex>.json and checks its envelope): swap does not parse
    envelopes itself.
    """
    installed = ctx.installed.read().get("daemon") or {}
    current = _link_release(ctx.paths.current)
    if not installed:
        return [] if current is None else [f"current -> {current} was not installed by OTA"]
    rid, manifest_hex = str(installed.get("release")), str(installed.get("manifest"))
    problems = []
    if current != rid:
        problems.append(f"current points at {current}, installed.json records {rid}")
    component = _component(load_manifest(manifest_hex))
    if release_id(component, manifest_hex) != rid:
        problems.append(f"installed.json's release {rid} does not belong to its manifest")
    problems += [f"{rid}/{p}" for p in verify_tree(ctx.paths.releases / rid, component)]
    return problems
