"""The verification policy bound to this host: its platform, this agent's version, the
clock reading the caller took, and free space. The policy itself is spk_visor.trust.verify.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

from smechvisord.version import VERSION
from spk_visor.errors import VerificationError
from spk_visor.trust import dsse
from spk_visor.trust import verify as policy
from spk_visor.trust.roots import Root

# What a node keeps free beyond the update itself (logs, VM records, one spare release).
SPARE_BYTES = 64 << 20


def node_compatible() -> str:
    return f"smechvisor/{platform.machine() or 'unknown'}"


def verify_manifest(
    env: dsse.Envelope,
    root: Root,
    *,
    start: dt.datetime,
    channel: policy.Channel | None = None,
) -> policy.Verified:
    """spk_visor.trust.verify.verify_manifest for this node and this agent."""
    return policy.verify_manifest(
        env, root, start=start, node=node_compatible(), agent_version=VERSION, channel=channel
    )


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_space(needs: dict[Path, int]) -> None:
    """Each filesystem must hold what goes there plus SPARE_BYTES."""
    by_fs: dict[int, tuple[Path, int]] = {}
    for path, n in needs.items():
        probe = path
        while not probe.exists():
            probe = probe.parent
        dev = os.stat(probe).st_dev
        prev = by_fs.get(dev, (probe, 0))
        by_fs[dev] = (prev[0], prev[1] + n)
    for probe, n in by_fs.values():
        free = free_bytes(probe)
        if n + SPARE_BYTES > free:
            raise VerificationError(
                f"not enough space on the filesystem of {probe}: "
                f"{(n + SPARE_BYTES) >> 20} MiB needed, {free >> 20} MiB free",
                "free space (spk-visor ota discard, old VM images) and try again",
            )
