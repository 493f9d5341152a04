"""Deploy Shim ISO figures: build time, ISO and initramfs size, boot-to-ready under QEMU.

    .venv/bin/python -m bench.deploy_iso   # root, and the tools of scripts/install-sysdeps

- build_s: wall time of shim_iso.build_iso with the kernel .deb already in the cache
  (the first run also downloads it once; that run is not representative).
- iso_mib / initrd_mib: the ISO and the compressed initramfs inside it.
- boot_ready_s: QEMU (TCG, no KVM, 1 GiB, SeaBIOS) from start to the "SPK-SHIM ready"
  line on serial: firmware, GRUB's timeout, kernel, initramfs unpack, coldplug, DHCP
  and the first Python start. Real hardware boots this in seconds; TCG is emulation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from spk_visor.deploy import shim_iso
from tests.support.ota_pki import Pki
from tests.support.shim_qemu import boot_iso


def run() -> dict[str, object]:
    """Measure; returns the figures (or {"skipped": reason})."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (initramfs owners, as the real build)"}
    for tool in ("grub-mkrescue", "xorriso", "busybox", "cpio", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return {"skipped": f"{tool} not installed (scripts/install-sysdeps)"}
    work = Path(tempfile.mkdtemp(prefix="svshimbench"))
    try:
        trust = work / "root.json"
        trust.write_bytes(Pki().root_env().to_bytes())
        kernel = shim_iso.find_kernel()  # download outside the timed part
        start = time.perf_counter()
        result = shim_iso.build_iso(work / "shim.iso", kernel=kernel, trust_root=trust)
        build_s = time.perf_counter() - start
        boot = boot_iso(result.path, work / "boot", uefi=False)
        return {
            "build_s": round(build_s, 1),
            "iso_bytes": result.size,
            "iso_mib": round(result.size / 2**20, 1),
            "initrd_mib": round(result.initrd_size / 2**20, 1),
            "compression": result.compression,
            "kernel": result.kernel_version,
            "boot_ready_s": round(boot.seconds, 1) if boot.matched else None,
            "warnings": list(result.warnings),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    r = run()
    if "skipped" in r:
        print(f"skipped: {r['skipped']}")
        return 0
    print(
        f"shim ISO {r['iso_mib']} MiB (initramfs {r['initrd_mib']} MiB, {r['compression']}), "
        f"built in {r['build_s']} s; QEMU TCG boot to ready: {r['boot_ready_s']} s"
    )
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
