"""A tiny bootable test base image and a signed release of it, for the deploy tests.

The image is a raw ext4 filesystem holding /boot/vmlinuz (a real Debian kernel) and
/boot/initrd.img (a newc cpio of static busybox whose /init prints MARKER with the slot
and the kernel command line on the serial console, then powers off). So a boot test proves
firmware -> GRUB -> grub.cfg -> the right slot -> kernel with the right command line.

The kernel comes from the Debian archive through apt (`apt-get download` of the versioned
package linux-image-cloud-amd64 depends on: the cloud flavour is small and boots fast under
TCG) and is cached under <repo>/.cache/deploy-test (or $SPK_VISOR_TEST_CACHE), so tests do
not download it again.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from spk_visor.ota import build
from tests.support.ota_pki import Pki, tiny_tree

MARKER = "SPK-TEST-BOOT-OK"
KERNEL_META = "linux-image-cloud-amd64"
IMAGE_MIB = 24
_REPO = Path(__file__).resolve().parents[2]

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1
slot=none
for arg in $(/bin/busybox cat /proc/cmdline); do
    case "$arg" in smechvisor.slot=*) slot="${arg#smechvisor.slot=}" ;; esac
done
echo "SPK-TEST-CMDLINE $(/bin/busybox cat /proc/cmdline)"
echo "SPK-TEST-BOOT-OK slot=$slot"
/bin/busybox sync
/bin/busybox poweroff -f
while true; do /bin/busybox sleep 60; done
"""


def cache_dir() -> Path:
    path = Path(os.environ.get("SPK_VISOR_TEST_CACHE") or _REPO / ".cache" / "deploy-test")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(argv: list[str], cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode()[-800:]}")
    return done.stdout


def kernel_package() -> str:
    """The versioned kernel package the cloud meta-package depends on."""
    out = _run(["apt-cache", "show", "--no-all-versions", KERNEL_META]).decode()
    match = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,]*-cloud-amd64)\b", out, re.M)
    if not match:
        raise RuntimeError(f"cannot find the kernel package {KERNEL_META} depends on")
    return match.group(1)


def kernel() -> Path:
    """A cached vmlinuz, downloaded and unpacked once."""
    cache = cache_dir()
    cached = sorted(cache.glob("vmlinuz-*"))
    if cached:
        return cached[-1]
    debs = sorted(cache.glob("linux-image-*-cloud-amd64*.deb"))
    if not debs:
        _run(["apt-get", "download", kernel_package()], cwd=cache)
        debs = sorted(cache.glob("linux-image-*-cloud-amd64*.deb"))
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _run(["dpkg-deb", "-x", str(debs[-1]), tmp])
        found = sorted(Path(tmp, "boot").glob("vmlinuz-*"))
        if not found:
            raise RuntimeError(f"{debs[-1]} holds no /boot/vmlinuz-*")
        target = cache / found[-1].name
        shutil.copyfile(found[-1], target.with_suffix(".tmp"))
        os.replace(target.with_suffix(".tmp"), target)
    return target


def initrd(out: Path) -> Path:
    """newc cpio (gzip) of static busybox and the marker-printing /init."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise RuntimeError("busybox not found: install busybox-static")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys"):
            (root / d).mkdir()
        shutil.copyfile(busybox, root / "bin" / "busybox")
        (root / "bin" / "busybox").chmod(0o755)
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = _run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            cwd=root,
            stdin=("\n".join(names) + "\n").encode(),
        )
    out.write_bytes(gzip.compress(archive, 6))
    return out


def base_image(out: Path) -> Path:
    """Raw ext4 image with /boot/vmlinuz and /boot/initrd.img, built without mounting."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "boot").mkdir()
        (root / "etc").mkdir()
        shutil.copyfile(kernel(), root / "boot" / "vmlinuz")
        initrd(root / "boot" / "initrd.img")
        (root / "etc" / "spk-test-image").write_text("slot image\n")
        with out.open("wb") as f:
            f.truncate(IMAGE_MIB << 20)
        _run(["mkfs.ext4", "-q", "-F", "-L", "spk-root", "-d", str(root), str(out)])
    return out


@dataclass
class TestRelease:
    pki: Pki
    result: build.BuildResult
    image: Path
    tree: Path


def release(tmp: Path, pki: Pki | None = None, *, version: str = "1.0.0") -> TestRelease:
    """A signed bundle holding the test base image and a tiny daemon tree."""
    pki = pki or Pki()
    image = base_image(tmp / "base.img")
    tree = tiny_tree(tmp / "tree", version)
    result = build.build(
        out=tmp / "release.spkb",
        version=version,
        counter=1,
        keys=pki.release,
        daemon_tree=tree,
        base_image=image,
    )
    return TestRelease(pki, result, image, tree)
