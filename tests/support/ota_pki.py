"""OTA test fixtures: keys for every role, root documents, node sandboxes and bundles.

Everything is real: ed25519 keys from `cryptography`, DSSE envelopes, bundles built by
spk_visor.ota.build. A node sandbox is a temporary SPK_VISOR_OTA_SYSROOT holding the
factory trust root, so nothing here touches the machine's own /var or /opt.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spk_visor.ota import build
from spk_visor.ota.context import OtaContext
from spk_visor.ota.nodeconf import NodeConfig, NodePaths
from spk_visor.ota.store import BlobStore
from spk_visor.trust import dsse, keys, roots

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class Pki:
    root: list[keys.SigningKey] = field(default_factory=lambda: [keys.generate()])
    release: list[keys.SigningKey] = field(default_factory=lambda: [keys.generate()])
    channel: list[keys.SigningKey] = field(default_factory=lambda: [keys.generate()])
    thresholds: dict[str, int] = field(
        default_factory=lambda: {"root": 1, "release": 1, "channel": 1}
    )

    def root_env(
        self,
        version: int = 1,
        *,
        expires: dt.timedelta = dt.timedelta(days=365),
        signers: list[keys.SigningKey] | None = None,
        dev: bool = False,
    ) -> dsse.Envelope:
        payload = roots.payload(
            version,
            NOW + expires,
            {
                role: (self.thresholds[role], [k.public for k in getattr(self, role)])
                for role in ("root", "release", "channel")
            },
            dev=dev,
        )
        env = dsse.new(dsse.ROOT_TYPE, payload)
        for key in self.root if signers is None else signers:
            env.sign(key)
        return env


@dataclass
class Node:
    """A node's OTA world under one temporary sysroot."""

    sysroot: Path

    @property
    def paths(self) -> NodePaths:
        return NodePaths(self.sysroot)

    @property
    def env(self) -> dict[str, str]:
        return {"SPK_VISOR_OTA_SYSROOT": str(self.sysroot)}

    def ctx(self, config: NodeConfig | None = None) -> OtaContext:
        return OtaContext(self.paths, config or NodeConfig())

    def install_root(self, env: dsse.Envelope) -> None:
        path = self.paths.factory_root
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(env.to_bytes())

    def write_conf(self, text: str) -> None:
        self.paths.conf.parent.mkdir(parents=True, exist_ok=True)
        self.paths.conf.write_text(text)

    def write_pull_conf(self, urls: list[str], **extra: object) -> None:
        """ota.conf for pull tests: these mirrors, download and verify only (the swap and
        the staging have their own tests), quick retries; `extra` overrides any key."""
        values: dict[str, object] = {
            "base_urls": urls,
            "node_id": "node-1",
            "apply_daemon": False,
            "stage_base": False,
            "fetch_attempts": 2,
            "fetch_backoff_s": 0.05,
            "fetch_timeout_s": 5,
            **extra,
        }
        self.write_conf("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))

    def tree_digest(self, *, skip: tuple[str, ...] = ("run/lock",)) -> str:
        """Names, modes, link targets and contents of everything under the sysroot."""
        digest = hashlib.sha256()
        for dirpath, dirnames, filenames in os.walk(self.sysroot):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.sysroot)
            if any(rel_dir == s or rel_dir.startswith(s + "/") for s in skip):
                continue
            for name in sorted(filenames + dirnames):
                if os.path.normpath(f"{rel_dir}/{name}") in skip:
                    continue
                path = Path(dirpath, name)
                st = path.lstat()
                digest.update(f"{rel_dir}/{name} {st.st_mode:o}\n".encode())
                if path.is_symlink():
                    digest.update(os.readlink(path).encode())
                elif path.is_file():
                    digest.update(path.read_bytes())
        return digest.hexdigest()


def make_node(tmp: Path, pki: Pki) -> Node:
    node = Node(tmp / "node")
    node.sysroot.mkdir(parents=True)
    node.install_root(pki.root_env())
    # A node that has been updated before: its store exists.
    BlobStore(node.paths).ensure()
    return node


def tiny_tree(path: Path, version: str) -> Path:
    if path.exists():
        return path
    (path / "bin").mkdir(parents=True)
    launcher = path / "bin" / "smechvisord"
    launcher.write_text(f"#!/bin/sh\necho smechvisord {version}\n")
    launcher.chmod(0o755)
    (path / "lib" / "smechvisord").mkdir(parents=True)
    (path / "lib" / "VERSION").write_text(version + "\n")
    # Where a release tree declares its version (spk_visor.ota.build.VERSION_FILE).
    (path / "lib" / "smechvisord" / "version.py").write_text(f"VERSION = {version!r}\n")
    return path


def make_bundle(
    tmp: Path,
    pki: Pki,
    *,
    version: str = "0.2.0",
    counter: int = 2,
    set_floor: int = 0,
    image: Path | None = None,
    tree: Path | None = None,
    signers: list[keys.SigningKey] | None = None,
    roots_carried: list[dsse.Envelope] | None = None,
    name: str | None = None,
) -> build.BuildResult:
    if tree is None and image is None:
        tree = tiny_tree(tmp / f"tree-{version}-{counter}", version)
    return build.build(
        out=tmp / (name or f"spk-{version}-{counter}.spkb"),
        version=version,
        counter=counter,
        keys=signers if signers is not None else pki.release,
        daemon_tree=tree,
        base_image=image,
        set_floor=set_floor,
        roots=roots_carried or [],
        # The trees given here are payloads for node-side checks, not runnable releases.
        check_tree=False,
    )


def signed_manifest(payload: dict[str, Any], signers: list[keys.SigningKey]) -> dsse.Envelope:
    """Sign a payload as given, even one the build side would refuse (for refusal tests)."""
    env = dsse.new(dsse.MANIFEST_TYPE, payload)
    for key in signers:
        env.sign(key)
    return env


def stub_worker(monkeypatch: Any, started: list[str] | None = None) -> None:
    """Replace the detached OTA worker with a process that exits at once and is followed
    to exit 0, recording each plan's manifest in `started`: for pull tests, whose subject
    is the fetch and the decision, not the swap (that has its own OpenRC tests)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from spk_visor.errors import ExitCode  # noqa: PLC0415
    from spk_visor.ota import engine  # noqa: PLC0415

    def fake_start(
        ctx: OtaContext, plan: engine.Plan, opts: engine.ApplyOptions, lock_fd: int
    ) -> subprocess.Popen[bytes]:
        if started is not None:
            started.append(plan.manifest_sha256)
        return subprocess.Popen([sys.executable, "-c", ""])

    def fake_follow(
        ctx: OtaContext,
        proc: subprocess.Popen[bytes] | None = None,
        manifest_hex: str | None = None,
    ) -> ExitCode:
        assert proc is not None
        proc.wait(timeout=30)
        return ExitCode.OK

    monkeypatch.setattr(engine, "start_worker", fake_start)
    monkeypatch.setattr(engine, "follow", fake_follow)
