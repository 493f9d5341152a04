"""An installed SmechVisor disk file, made by the install path deploy's receiver runs.

The same library calls as the receiver (spk_visor.deploy.install): the PLAN validated
against the trust root, then prepare (wipe, GPT, mkfs), every blob of the signed bundle
streamed into its sink (the base image onto slot A, the daemon pack unpacked on the data
partition, both kept in the node's OTA store), and finalize (config, the admin's SSH key,
GRUB for BIOS and UEFI). Only the transport is missing: the bundle is read from a file
instead of the SPAKE2 channel. The target is a sparse file behind a loop device, detached
afterwards, so QEMU can boot the file as the machine's disk.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from spk_visor.deploy.install import Installer, validate_plan
from spk_visor.deploy.inventory import inventory
from spk_visor.ota import bundle as bundle_mod
from spk_visor.trust import roots
from tests.support.loopdisk import LoopDisk

DISK_SIZE = "3G"


def install(
    bundle: Path,
    manifest: Path,
    root_json: Path,
    workdir: Path,
    authorized_keys: str,
    hostname: str = "node-1",
) -> tuple[Path, dict[str, Any]]:
    """A disk file with the release installed; (its path, the install REPORT)."""
    workdir.mkdir(parents=True, exist_ok=True)
    disk = LoopDisk(workdir, DISK_SIZE)
    mnt = workdir / "mnt"
    try:
        subprocess.run(["udevadm", "settle", "--timeout=10"], capture_output=True, check=False)
        found = [d for d in inventory(allow_loop=True) if d.serial == disk.serial]
        assert len(found) == 1, f"inventory does not show {disk.serial}"
        plan = {
            "manifest": json.loads(manifest.read_bytes()),
            "disk": {"serial": found[0].serial, "size": found[0].size},
            "layout": "ab",
            "hostname": hostname,
            "confirm_wipe_serial": None,
            "authorized_keys": authorized_keys,
        }
        root = roots.load_anchor(root_json.read_bytes(), str(root_json))
        resolved = validate_plan(plan, found, root)
        inst = Installer(resolved, mnt, lambda _kind, _doc: None)
        try:
            inst.prepare()
            with bundle.open("rb") as f:
                bundle_mod.read_header(f)
                for blob_id, size in resolved.manifest.blobs.items():
                    sink = inst.receive(blob_id, size)
                    left = size
                    while left:
                        chunk = f.read(min(1 << 20, left))
                        sink.write(chunk)
                        left -= len(chunk)
                    sink.finish()
            report = inst.finalize()
        except BaseException:
            inst.abort("test failure")
            raise
        assert report["ok"], report
        os.sync()
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True, check=False)
        subprocess.run(["partx", "--delete", disk.dev], capture_output=True, timeout=30,
                       check=False)  # fmt: skip
        disk.detach()
    return disk.file, report
