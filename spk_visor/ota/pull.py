"""The cron path: `spk-visor ota pull` against a static repository (ota.md, "Pull mode").

One conditional GET of the channel per run; everything else is immutable and named by
hash. The channel is verified (threshold, serial, expiry) before it is believed, the node's
rollout bucket decides eligibility with no server logic, blobs download resumably from
mirrors in order, and the apply runs through the same engine as a pushed bundle.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spk_visor.capped_read import read_at_most
from spk_visor.errors import (
    ExitCode,
    NotEligibleError,
    TransportError,
)
from spk_visor.ota import durable, engine, journal, repo
from spk_visor.ota.bundle import BundleHeader
from spk_visor.ota.context import OtaContext
from spk_visor.ota.fetch import Fetcher
from spk_visor.ota.nodeconf import node_id
from spk_visor.trust import dsse, verify

CHANNEL_CAP = 16 * 1024
MANIFEST_CAP = 1 << 20
# Backoff after transient failures: 5 min doubling to 6 h, persisted across runs.
BACKOFF_FIRST = 300.0
BACKOFF_MAX = 6 * 3600.0


@dataclass
class PullOptions:
    channel: str | None = None
    jitter: float = 0.0
    apply_daemon: bool | None = None
    stage_base: bool | None = None
    interactive: bool = False


def bucket(node: str, salt: str) -> int:
    """The node's rollout bucket, 0..9999: stable per node and salt, spread evenly."""
    return int(hashlib.sha256(f"{node}{salt}".encode()).hexdigest()[:8], 16) % 10000


def eligible(node: str, salt: str, percent: float) -> bool:
    return bucket(node, salt) < percent * 100


class _PullState:
    """pull.json: ETag of the channel and the backoff schedule."""

    def __init__(self, ctx: OtaContext) -> None:
        self.path = ctx.paths.state_dir / "pull.json"
        try:
            self.doc: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.doc = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.write_json(self.path, self.doc)

    def failed(self) -> float:
        failures = int(self.doc.get("failures", 0)) + 1
        wait = float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1)))
        self.doc.update(failures=failures, next_attempt=time.time() + wait)
        self.save()
        return wait

    def succeeded(self) -> None:
        if self.doc.get("failures"):
            self.doc.update(failures=0, next_attempt=0)
            self.save()


def _read_capped(path: Path, cap: int) -> bytes | None:
    try:
        data = read_at_most(path, cap)
    except OSError:
        return None
    return data if len(data) <= cap else None


def inhibited(ctx: OtaContext) -> str | None:
    for path in (
        ctx.paths.sysroot / "etc/spk-visor/inhibit",
        ctx.paths.sysroot / "run/spk-visor-ota.inhibit",
    ):
        if path.exists():
            return str(path)
    return None


@dataclass
class _Started:
    """The worker runs the update; the caller follows it once the lock is released."""

    proc: subprocess.Popen[bytes]
    plan_doc: dict[str, Any]
    manifest_hex: str


def run(ctx: OtaContext, opts: PullOptions) -> tuple[ExitCode, dict[str, Any]]:
    config = ctx.config
    if not config.base_urls:
        # Not an error: every image node runs the pull from cron, and a node that was
        # given no repository simply does not pull (silent under -q, as cron mails output).
        raise NotEligibleError(
            f"no repository configured (base_urls in {ctx.paths.conf}): this node does not pull",
            'add base_urls = ["https://..."] to ota.conf to pull updates',
        )
    channel_name = opts.channel or config.channel
    if not opts.interactive and opts.jitter > 0:
        # Spread a fleet's cron runs so the repository never sees them all at once. Slept
        # before taking the lock: an admin's push meanwhile is not refused as busy.
        time.sleep(random.uniform(0, opts.jitter))  # noqa: S311 (not security)
    with journal.locked(ctx.paths, "pull") as lock_fd:
        engine.recover_all(ctx)
        state = _PullState(ctx)
        if not opts.interactive and time.time() < float(state.doc.get("next_attempt", 0)):
            raise TransportError(
                "backing off after earlier failures",
                f"next attempt after {time.ctime(float(state.doc['next_attempt']))}; "
                "run it on a terminal to try now",
            )
        why = inhibited(ctx)
        if why:
            raise NotEligibleError(f"updates are inhibited by {why}", "remove it to allow updates")
        engine.check_preconditions(ctx)
        fetcher = Fetcher.from_config(config)
        try:
            result = _pull(ctx, fetcher, state, channel_name, opts, lock_fd)
        except TransportError:
            state.failed()
            raise
        state.succeeded()
        if not isinstance(result, _Started):
            return result
    # Our copy of the lock is closed; the worker holds it until it exits.
    code = engine.follow(ctx, proc=result.proc, manifest_hex=result.manifest_hex)
    return code, {"changed": True, **result.plan_doc}


def _pull(
    ctx: OtaContext,
    fetcher: Fetcher,
    state: _PullState,
    channel_name: str,
    opts: PullOptions,
    lock_fd: int,
) -> tuple[ExitCode, dict[str, Any]] | _Started:
    config = ctx.config
    start = engine.utcnow()
    floor = ctx.floor.read()
    verify.check_clock(start, str(floor.get("clock_floor", "")), assume_time=False)

    # 1. The root chain: walk root/N+1... until 404; each new root is saved as verified.
    def next_root(version: int) -> bytes | None:
        res = fetcher.get_small(repo.rel_root(version), 512 * 1024)
        return res.body if res.status == 200 else None

    root, _added = engine.trust_store(ctx).update(next_root)
    # 2. The channel, conditionally. A 304 does not end the run: the document seen last
    # time is verified again (expiry included) and the plan recomputed, so a daemon swap
    # that waited for a base reboot, or a download-only run, is picked up by the next pull
    # without the channel having to change.
    etags = state.doc.setdefault("etags", {})
    stored = (floor.get("channels") or {}).get(channel_name)
    seen_path = ctx.paths.state_dir / "channels" / f"{channel_name}.json"
    seen = _read_capped(seen_path, CHANNEL_CAP) if stored else None
    res = fetcher.get_small(
        repo.rel_channel(channel_name), CHANNEL_CAP, etags.get(channel_name) if seen else None
    )
    if res.status == 404:
        raise TransportError(f"channel {channel_name} not found at {res.url}")
    not_modified = res.status == 304 and seen is not None
    if not_modified:
        ctx.log(f"channel {channel_name}: not modified")
    body = seen if not_modified and seen is not None else res.body
    env = dsse.from_bytes(body, dsse.CHANNEL_TYPE)
    channel, unchanged = verify.verify_channel(
        env, root, name=channel_name, start=start, stored=stored
    )
    if not unchanged:
        floor.setdefault("channels", {})[channel_name] = {
            "serial": channel.serial,
            "issued": channel.issued,
            "keyids": sorted(root.keyids("channel")),
            "payload_sha256": env.payload_sha256,
        }
        if channel.issued and channel.issued > str(floor.get("clock_floor", "")):
            floor["clock_floor"] = channel.issued
        ctx.floor.write(floor)
        seen_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.write_bytes(seen_path, body)
    if res.etag and not not_modified:
        etags[channel_name] = res.etag
        state.save()
    # 3. Eligibility.
    me = node_id(ctx.paths, config)
    if not eligible(me, channel.salt, channel.percent):
        raise NotEligibleError(
            f"this node is outside the rollout ({channel.percent:g}% of nodes, "
            f"bucket {bucket(me, channel.salt)})",
            "it becomes eligible when the channel widens the rollout",
        )
    if channel.manifest_sha256 in floor.get("bad_manifests", []):
        raise NotEligibleError(
            f"release {channel.version} was rolled back on this node before",
            "it is skipped until the channel points to another release",
        )
    # 4. The manifest, pinned by the channel.
    # Verified before and kept in the store: no request (a cron run on an up-to-date node
    # costs one conditional GET).
    manifest_raw = _read_capped(
        ctx.store.manifests_dir / f"{channel.manifest_sha256}.json", MANIFEST_CAP
    )
    if manifest_raw is None:
        mres = fetcher.get_small(repo.rel_manifest(channel.manifest_sha256), MANIFEST_CAP)
        if mres.status != 200:
            raise TransportError(f"manifest {channel.manifest_sha256[:12]} missing at {mres.url}")
        manifest_raw = mres.body
    header = BundleHeader(dsse.from_bytes(manifest_raw, dsse.MANIFEST_TYPE), [], 0)
    v = engine.verify_header(
        ctx,
        header,
        mode="pull",
        allow_downgrade=False,
        assume_time=False,
        channel=channel,
        root=root,
        new_roots=[],
    )
    if v.verified.downgrade:
        ctx.log(f"WARNING: the signed channel reverts this node: {'; '.join(v.verified.notes)}")
    plan = v.plan
    m = v.verified.manifest
    if unchanged and not plan.changes:
        return ExitCode.OK, {"changed": False, "reason": "already installed", **plan.to_doc()}
    # 5. Blobs, resumable, from the mirrors in order.
    wanted = engine.needed_blobs(m, plan.daemon, plan.base)
    total = sum(wanted.values())
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        ctx.emit("progress", {"phase": "download", "bytes": done, "total": total})

    for blob_id, size in wanted.items():
        fetcher.fetch_blob(blob_id, size, ctx.store, progress)
    engine.persist_verified(ctx, v)
    if not unchanged:  # a cron run that finds the same channel again is not news
        ctx.history.append(
            "verified",
            manifest=v.verified.sha256,
            version=m.release.version,
            counter=m.release.counter,
            channel=channel_name,
            serial=channel.serial,
            keyids=sorted(v.verified.signers),
            plan=plan.to_doc(),
        )
    # 6. Policy: what this node applies unattended.
    do_daemon = config.apply_daemon if opts.apply_daemon is None else opts.apply_daemon
    do_base = config.stage_base if opts.stage_base is None else opts.stage_base
    daemon_now = plan.daemon == "swap" and do_daemon
    base_now = plan.base == "stage" and do_base
    if not (daemon_now or base_now):
        if plan.daemon == "deferred":
            raise NotEligibleError(
                "the daemon release waits for a base reboot", "; ".join(plan.notes)
            )
        return ExitCode.OK, {
            "changed": False,
            "downloaded": total,
            "reason": "download only (policy)",
            **plan.to_doc(),
        }
    opts_apply = engine.ApplyOptions(mode="pull", apply_daemon=daemon_now, stage_base=base_now)
    proc = engine.start_worker(ctx, plan, opts_apply, lock_fd)
    return _Started(proc, plan.to_doc(), plan.manifest_sha256)
