"""The releases of the end-to-end chain, made the way an admin makes them: with the CLI.

    keys     `spk-visor ota keygen` (root, release, channel), `ota root init` and
             `ota root sign`: made once and kept under .cache/e2e/pki, because the root
             is baked into the image and a new root would mean a new image every run
    image    `spk-visor image build --root root.json` (cached by its inputs)
    bases    v2 and v3 are the same image with an overlay (`image build --overlay`):
             v2 adds a marker file, v3 a marker and a required health.d check that fails
    trees    `scripts/build-dist --version` (what `make dist` runs), one per release
    bundles  `spk-visor ota build` of each tree and base, signed with the release key

A missing tool fails the caller's test through the `need` callback (pytest.skip in the
tests, turned into a failure under CI=true).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.e2e_release import Pki, cli, daemon_tree, pki

BUILD_TIMEOUT_S = 1800
# What the v2 and v3 bases carry, to tell which slot content booted.
MARKER = "etc/smechvisor-e2e-base"
FAILING_CHECK = "etc/spk-visor/health.d/required/90-e2e-refuses-this-base"
FAILING_REASON = "e2e: this base is built to fail its trial boot"


@dataclass
class Release:
    version: str
    counter: int
    bundle: Path
    manifest_sha256: str
    base: dict[str, Any]  # `image build --json` of its base
    daemon_tree: Path


@dataclass
class Releases:
    pki: Pki
    v1: Release
    v2: Release
    v3: Release
    seconds: dict[str, float] = field(default_factory=dict)


def _overlay(directory: Path, version: str, failing: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"base {version}\n")
    marker.chmod(0o644)
    if failing:
        check = directory / FAILING_CHECK
        check.parent.mkdir(parents=True, exist_ok=True)
        check.write_text(f'#!/bin/sh\necho "{FAILING_REASON}"\nexit 1\n')
        check.chmod(0o755)
    for d in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        d.chmod(0o755)
    return directory


def image(pki: Pki, *extra: str) -> dict[str, Any]:
    """`spk-visor image build --root ... --json`: the (cached) image's document."""
    run = cli("image", "build", "--root", str(pki.root_json), "--json", *extra,
                 timeout=BUILD_TIMEOUT_S)  # fmt: skip
    doc: dict[str, Any] = json.loads(run.stdout)
    return doc


def bundle(pki: Pki, out: Path, version: str, counter: int, base: Path,
           tree: Path | None) -> str:  # fmt: skip
    """`spk-visor ota build`, signed with the release key; the manifest's sha256."""
    argv = ["ota", "build", "--version", version, "--counter", str(counter)]
    argv += ["--key", str(pki.release_key), "--base-image", str(base), "--out", str(out)]
    argv += ["--root", str(pki.root_json), "--json"]
    if tree is not None:
        argv += ["--daemon-tree", str(tree)]
    doc = json.loads(cli(*argv, timeout=BUILD_TIMEOUT_S).stdout)
    return str(doc["manifest_sha256"])


def build(workdir: Path, need: Callable[[str, str], Any] | None = None) -> Releases:
    """v1 (the image and daemon 1.0.0), v2 (a marked base and daemon 2.0.0), and v3 (a
    base whose required health check fails, and no daemon: the node keeps 2.0.0)."""
    seconds: dict[str, float] = {}
    t = time.monotonic()
    keys = pki()
    seconds["keys"] = time.monotonic() - t
    plans = {
        "1.0.0": (1, None, True),
        "2.0.0": (2, _overlay(workdir / "overlay-2", "2.0.0", failing=False), True),
        "3.0.0": (3, _overlay(workdir / "overlay-3", "3.0.0", failing=True), False),
    }
    made: list[Release] = []
    for version, (counter, overlay, with_daemon) in plans.items():
        t = time.monotonic()
        base = image(keys, *(["--overlay", str(overlay)] if overlay else []))
        seconds[f"image {version}"] = time.monotonic() - t
        t = time.monotonic()
        tree = daemon_tree(workdir / f"tree-{version}", version) if with_daemon else None
        out = workdir / f"v{counter}.spkb"
        sha = bundle(keys, out, version, counter, Path(base["path"]), tree)
        seconds[f"bundle {version}"] = time.monotonic() - t
        made.append(Release(version, counter, out, sha, base, tree or Path()))
    return Releases(keys, made[0], made[1], made[2], seconds)
