"""The daemon swap's preflight runs with the settings the service gets: the literal
SMECHVISORD_* lines of <sysroot>/etc/conf.d/<service>, under SPK_VISOR_OTA_SYSROOT like
every other node path, never the host's /etc/conf.d when a sandbox sysroot is in use."""

from __future__ import annotations

import uuid
from pathlib import Path

from spk_visor.errors import ExitCode
from spk_visor.ota import swap
from spk_visor.ota.context import OtaContext
from spk_visor.ota.nodeconf import NodeConfig, NodePaths
from spk_visor.ota.store import BlobStore
from spk_visor.trust import manifest
from tests.support.ota_release import ingest_pack, payload_hex, tree_manifest

# Fails its self-check on purpose, saying what it was given: the reason the swap records
# then shows which settings the preflight ran with, and nothing is ever switched.
LAUNCHER = """#!/bin/sh
echo "bind=${SMECHVISORD_BIND:-unset} state=${SMECHVISORD_STATE_DIR:-unset}" >&2
exit 1
"""


def test_preflight_reads_conf_d_under_the_sysroot(tmp_path: Path) -> None:
    service = f"spkpre-{uuid.uuid4().hex[:8]}"  # no such service on the host
    sysroot = tmp_path / "sysroot"
    conf_d = sysroot / "etc" / "conf.d"
    conf_d.mkdir(parents=True)
    (conf_d / service).write_text(
        "# a sandbox node's settings\n"
        "SMECHVISORD_BIND='127.0.0.1:18123'\n"
        f'SMECHVISORD_STATE_DIR="{tmp_path}/state"\n'
        'SMECHVISORD_LOG="$HOME/needs-a-shell"\n'
    )
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "smechvisord").write_text(LAUNCHER)
    (tree / "bin" / "smechvisord").chmod(0o755)
    payload, pack = tree_manifest(tree, "1.0.0", 1, service=service)
    paths = NodePaths(sysroot)
    BlobStore(paths).ensure()
    ingest_pack(BlobStore(paths), payload, pack)
    ctx = OtaContext(paths, NodeConfig(service=service, rc_service=("false",)))

    code = swap.run(ctx, manifest.parse(payload), payload_hex(payload))

    assert code == ExitCode.ROLLED_BACK
    reason = ctx.journal.get("daemon")["reason"]
    assert reason.startswith("preflight failed"), reason
    assert f"bind=127.0.0.1:18123 state={tmp_path}/state" in reason, reason
    assert not paths.current.exists()  # nothing switched
