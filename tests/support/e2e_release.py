"""The end-to-end test's inputs, made by the real CLI: keys, root, base image, releases, ISO.

Everything runs `python -m spk_visor ...` as a subprocess, as an operator types it.
What is slow is cached under the checkout's .cache/ by content:

- the keys and the signed root (`ota keygen`, `ota root init`, `ota root sign`) are made
  once into .cache/e2e/pki/: the root is an input of the base image, so fresh keys at
  every run would make every run a cold image build. They are test keys, nothing else
  trusts them;
- the base image is cached by `image build` itself (.cache/image/<input key>/); v2's and
  v3's bases are the same image with an overlay (`image build --overlay`): v2 adds a
  marker file, v3 a marker and a required health.d check that fails;
- the Deploy Shim ISO under .cache/e2e/shim/<key>.iso, keyed by the trust root and the
  sources that go into the initramfs; the kernel .deb it is built from stays in
  .cache/e2e/downloads/ (a new Debian kernel is picked up when those inputs change).

Releases (`ota build`) are signed into the test's own directory at every run: they take
seconds, and they are what the test checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "e2e"
# A cold image build is mmdebstrap plus the rest: minutes on a loaded machine.
BUILD_TIMEOUT_S = 1800
CLI_TIMEOUT_S = 600
# The node's interpreter, as the image has it: the release launcher's shebang.
NODE_PYTHON = "/usr/bin/python3"
# What the v2 and v3 bases carry, to tell which slot's content booted.
MARKER = "etc/smechvisor-e2e-base"
FAILING_CHECK = "etc/spk-visor/health.d/required/90-e2e-refuses-this-base"
FAILING_REASON = "e2e: this base is built to fail its trial boot"


def cli(*args: str, timeout: float = CLI_TIMEOUT_S, env: dict[str, str | None] | None = None,
        check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`spk-visor ARGS` as a subprocess of this interpreter; with check, exit 0 or fail.
    `env` is laid over this process's environment; a None value removes the variable."""
    merged = {**os.environ, **(env or {})}
    run = subprocess.run(
        [sys.executable, "-m", "spk_visor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env={k: v for k, v in merged.items() if v is not None},
    )
    if check and run.returncode != 0:
        raise AssertionError(
            f"spk-visor {' '.join(args)} exited {run.returncode}:\n"
            f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        )
    return run


@dataclass(frozen=True)
class Pki:
    root_json: Path
    release_key: Path  # private; `.pub` beside it


def pki(cache: Path = CACHE) -> Pki:
    """Root, release and channel keys and the signed root document, made by the CLI once."""
    done = cache / "pki"
    if not (done / "root.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".pki-", dir=cache))
        try:
            for name in ("root", "release", "channel"):
                cli("ota", "keygen", str(work / name))
            cli(
                "ota", "root", "init", "-o", str(work / "root.json"),
                "--root-key", str(work / "root.pub"),
                "--release-key", str(work / "release.pub"),
                "--channel-key", str(work / "channel.pub"),
                "--expires", "10y",
            )  # fmt: skip
            cli("ota", "root", "sign", str(work / "root.json"), "--key", str(work / "root"))
            # One rename: a run that dies half-way leaves no half set behind.
            if not done.exists():
                os.replace(work, done)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Pki(done / "root.json", done / "release")


def base_image(root_json: Path, overlay: Path | None = None) -> dict[str, Any]:
    """`image build --root ROOT [--overlay DIR] --json`: the result document (path,
    sha256, stages...)."""
    extra = ["--overlay", str(overlay)] if overlay is not None else []
    run = cli("image", "build", "--root", str(root_json), "--json", *extra,
              timeout=BUILD_TIMEOUT_S)  # fmt: skip
    doc: dict[str, Any] = json.loads(run.stdout)
    return doc


def overlay(directory: Path, version: str, *, failing: bool) -> Path:
    """A tree for `image build --overlay`: the marker naming `version`; with `failing`,
    also a required health check that always fails (a base that must not be committed)."""
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


def daemon_tree(dest: Path, version: str) -> Path:
    """`make dist VERSION=...`: the smechvisord release tree for the node's python."""
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts/build-dist"), "--out", str(dest),
         "--python", NODE_PYTHON, "--version", version],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return dest


@dataclass(frozen=True)
class Release:
    version: str
    counter: int
    bundle: Path
    manifest: Path
    manifest_sha256: str


def release(out_dir: Path, keys: Pki, version: str, counter: int, base: Path | None,
            *, daemon: bool = True) -> Release:  # fmt: skip
    """`ota build`: a signed bundle of a fresh daemon tree (none without `daemon`: the node
    keeps the daemon it runs), with `base` as its base image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = out_dir / f"v{version}.spkb"
    argv = [
        "ota", "build", "--version", version, "--counter", str(counter),
        "--key", str(keys.release_key), "--root", str(keys.root_json), "-o", str(bundle),
        "--json",
    ]  # fmt: skip
    if daemon:
        argv += ["--daemon-tree", str(daemon_tree(out_dir / f"dist-{version}", version))]
    if base is not None:
        argv += ["--base-image", str(base)]
    doc = json.loads(cli(*argv, timeout=900).stdout)
    manifest = bundle.with_suffix(".manifest.json")
    return Release(version, counter, bundle, manifest, str(doc["manifest_sha256"]))


def _shim_key(root_json: Path) -> str:
    """The ISO's inputs: the trust root, the code baked into the initramfs, the kernel."""
    digest = hashlib.sha256(root_json.read_bytes())
    for top in ("spk_visor", "smechvisord", "shim"):
        for path in sorted((REPO / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode() + b"\0")
                digest.update(path.read_bytes())
    digest.update((REPO / "pyproject.toml").read_bytes())
    return digest.hexdigest()[:32]


def shim_iso(root_json: Path, cache: Path = CACHE) -> tuple[Path, bool]:
    """`deploy shim-iso --trust-root ROOT`, cached by its inputs; (path, was cached)."""
    iso = cache / "shim" / f"{_shim_key(root_json)}.iso"
    if iso.is_file():
        return iso, True
    iso.parent.mkdir(parents=True, exist_ok=True)
    for old in iso.parent.glob("*.iso"):
        old.unlink()  # one ISO is kept: the inputs changed
    partial = iso.with_name(f".{iso.name}.partial")
    # The kernel .deb the shim is built from is downloaded (apt) into the same cache.
    cli(
        "deploy", "shim-iso", "-o", str(partial), "--trust-root", str(root_json),
        timeout=900, env={"XDG_CACHE_HOME": str(cache / "downloads")},
    )  # fmt: skip
    os.replace(partial, iso)
    return iso, False


class Timings:
    """Each step's wall time: printed as it ends, and written to a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps: dict[str, float] = {}
        self._start = time.monotonic()

    def done(self, step: str) -> float:
        now = time.monotonic()
        seconds = round(now - self._start, 1)
        self._start = now
        self.steps[step] = seconds
        print(f"[e2e] {step}: {seconds:.1f} s", flush=True)
        self.path.write_text(json.dumps(self.steps, indent=2) + "\n")
        return seconds
