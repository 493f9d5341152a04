"""The base image for tests: built once per input hash (the builder's cache under .cache/).

The trust root must be the same bytes at every run, or every run would be a cold
build: its keys come from fixed seeds and it expires on a fixed date. These are test keys,
public by construction (anyone can derive them from the seeds here); a test that signs a
release for the image uses `test_pki()`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spk_visor.trust import keys
from tests.support.mounts import unmount
from tests.support.ota_pki import Pki

REPO = Path(__file__).resolve().parents[2]
ROOT_EXPIRES = dt.datetime(2036, 1, 1, tzinfo=dt.UTC)
# Generous: a cold build is mmdebstrap (minutes on a loaded machine) plus the rest.
BUILD_TIMEOUT_S = 1800


def _seeded(name: str) -> keys.SigningKey:
    seed = hashlib.sha256(f"spk-visor image test key: {name}".encode()).digest()
    return keys.SigningKey(Ed25519PrivateKey.from_private_bytes(seed))


def test_pki() -> Pki:
    """Root, release and channel keys that are the same at every run."""
    return Pki(root=[_seeded("root")], release=[_seeded("release")], channel=[_seeded("channel")])


def root_json_bytes() -> bytes:
    from spk_visor.trust import dsse, roots  # noqa: PLC0415

    pki = test_pki()
    payload = roots.payload(
        1,
        ROOT_EXPIRES,
        {
            role: (pki.thresholds[role], [k.public for k in getattr(pki, role)])
            for role in ("root", "release", "channel")
        },
    )
    env = dsse.new(dsse.ROOT_TYPE, payload)
    for key in pki.root:
        env.sign(key)
    return env.to_bytes()


def build_image(
    workdir: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """`spk-visor image build --json` with the test root; the JSON result and the run."""
    root_json = workdir / "root.json"
    root_json.write_bytes(root_json_bytes())
    argv = [sys.executable, "-m", "spk_visor", "image", "build", "--root", str(root_json)]
    run = subprocess.run(
        [*argv, "--json", *extra],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if run.returncode != 0:
        raise AssertionError(f"image build failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return json.loads(run.stdout), run


@contextlib.contextmanager
def mounted(image: Path) -> Iterator[Path]:
    """The image loop-mounted read-only on a fresh directory; unmounted afterwards."""
    mnt = Path(tempfile.mkdtemp(prefix="spk-image-mnt-"))
    try:
        subprocess.run(
            ["mount", "-o", "ro,loop,noload", "-t", "ext4", str(image), str(mnt)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        try:
            yield mnt
        finally:
            # A file still open under it (a failed test's) makes a plain umount fail.
            unmount(mnt)
    finally:
        mnt.rmdir()
