"""`spk-visor image build`: inputs -> cache key -> the image, or the cached one.

The cache key is a sha256 over every input that decides the image's bytes: this
builder's own source, the package list and options, the apt sources, SOURCE_DATE_EPOCH,
the checkout's packages (spk_visor, smechvisord, pyproject.toml), the trust root, the
VMM binary and firmware, and a release tree given with --daemon-tree. What the mirror
serves is not in it: the same key is the same image only while the mirror serves the
same package versions (Debian 12's point releases and security updates change them),
so `--rebuild` ignores a cached result.

The build itself:
    mmdebstrap          Debian 12 minbase + the node's packages, through apt only
    node files          trust root, ota.conf, health.d, /data links, sshd, network, VMM
    python              spk-visor from wheels; the daemon release tree; bytecode
    services            OpenRC runlevels
    prune               kernel modules, docs, caches, logs; fresh initramfs
    seal                apt, dpkg and pip replaced by refusing stubs
    stage               a sorted copy on a tmpfs (a fixed file order for mkfs)
    ext4                mkfs.ext4 -d, reproducible (ext4.py)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import spk_visor
from smechvisord.version import VERSION
from spk_visor.deploy import shim_iso
from spk_visor.errors import ConfigError, UsageError
from spk_visor.image import ext4, pyenv, rootfs, sources
from spk_visor.image import overlay as overlay_mod
from spk_visor.image.pyenv import ImageBuildError

IMAGE_NAME = "smechvisor-base.img"
LABEL = "smechvisor"
# Bumped when the builder changes what it makes in a way its source hash would not show.
FORMAT = 1
# Every time stamp in the image when SOURCE_DATE_EPOCH is not set.
DEFAULT_EPOCH = 1704067200  # 2024-01-01T00:00:00Z
REQUIRED_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "strip": "binutils",
    "zstd": "zstd",
}
# Images (and wheel sets, and Debian trees) kept in the cache, newest first.
CACHE_KEEP = 3
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Inputs:
    source: Path  # the checkout: pyproject.toml, spk_visor/, smechvisord/
    root_json: Path
    vmm: Path | None = None
    vmm_firmware: Path | None = None
    daemon_tree: Path | None = None
    sources_file: Path | None = None
    epoch: int | None = None
    overlay: Path | None = None  # files laid over the built image (overlay.py)


@dataclass
class Result:
    path: Path
    key: str
    cached: bool
    raw_bytes: int
    zstd_bytes: int
    sha256: str
    seconds: float
    epoch: int
    kernel: str = ""
    daemon_release: str = ""
    spk_visor_version: str = ""
    vmm: bool = False
    sealed: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["path"] = str(self.path)
        return doc


def checkout() -> Path:
    """The source tree spk-visor runs from; the image's wheel is built from it."""
    src = Path(spk_visor.__file__).resolve().parents[1]
    if not (src / "pyproject.toml").is_file():
        raise UsageError(
            f"spk-visor is not running from a source checkout ({src} has no pyproject.toml)",
            "run `spk-visor image build` (or `make image`) from a checkout of spk-visor",
        )
    return src


def cache_root(source: Path) -> Path:
    return source / ".cache" / "image"


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH, else a fixed date.

    Not the checkout's last commit time: every commit would then change the Debian
    tree's timestamps, and so its cache key, and every CI run would download Debian again.
    """
    env = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not env:
        return DEFAULT_EPOCH
    if not env.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH={env!r} is not a number of seconds")
    return int(env)


def _hash_tree(digest: Any, tree: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".pyc"):
                continue
            path = Path(dirpath, name)
            digest.update(f"{path.relative_to(tree).as_posix()}\0".encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            else:
                digest.update(f"{path.stat().st_mode & 0o777:o}\0".encode())
                digest.update(path.read_bytes())


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_key(inputs: Inputs, sources_text: str, epoch: int) -> str:
    digest = hashlib.sha256()
    doc = {
        "format": FORMAT,
        "suite": rootfs.SUITE,
        "packages": rootfs.PACKAGES,
        "dpkg_exclude": rootfs.DPKG_EXCLUDE,
        "dpkg_include": rootfs.DPKG_INCLUDE,
        "module_prune": rootfs.MODULE_PRUNE,
        "sources": sources_text,
        "epoch": epoch,
        "root_json": _hash_file(inputs.root_json),
        "vmm": _hash_file(inputs.vmm) if inputs.vmm else None,
        "vmm_firmware": _hash_file(inputs.vmm_firmware) if inputs.vmm_firmware else None,
    }
    digest.update(json.dumps(doc, sort_keys=True).encode())
    for package in ("spk_visor", "smechvisord"):
        _hash_tree(digest, inputs.source / package)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (inputs.source / name).is_file():
            digest.update(name.encode() + b"\0" + (inputs.source / name).read_bytes())
    if inputs.daemon_tree is not None:
        _hash_tree(digest, inputs.daemon_tree)
    return digest.hexdigest()


def _check_inputs(inputs: Inputs) -> None:
    if os.geteuid() != 0:
        raise UsageError(
            "building the image needs root (mmdebstrap --mode=root, chroot, mount)",
            "run it as root, e.g. sudo make image",
        )
    for tool, package in REQUIRED_TOOLS.items():
        if shutil.which(tool) is None:
            raise ConfigError(f"{tool} not found", f"install the Debian package {package}")
    for what, path in (
        ("--vmm", inputs.vmm),
        ("--vmm-firmware", inputs.vmm_firmware),
        ("--sources", inputs.sources_file),
    ):
        if path is not None and not path.is_file():
            raise UsageError(f"{what} {path}: no such file")
    if inputs.vmm is not None and not os.access(inputs.vmm, os.X_OK):
        raise UsageError(f"--vmm {inputs.vmm} is not executable", "chmod +x it, or pass another")
    if inputs.daemon_tree is not None and not (inputs.daemon_tree / "bin/smechvisord").is_file():
        raise UsageError(
            f"--daemon-tree {inputs.daemon_tree} has no bin/smechvisord",
            "pass a release tree made by `make dist`",
        )
    if inputs.overlay is not None:
        overlay_mod.check(inputs.overlay)


def trust_root(path: Path | None) -> Path:
    """The root document to bake in, checked now (shim_iso refuses a bad one the same way)."""
    shim_iso._load_trust_root(path, "--root")
    if path is None:
        raise UsageError("no trust root given", "pass --root FILE (the OTA root.json)")
    return path


@contextlib.contextmanager
def _tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    pyenv.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "spk-image", str(path)]
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)


def _mounted(root: Path) -> list[str]:
    """Mount points at or under `root` (a build must leave none behind)."""
    prefix = str(root.resolve())
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1]
            if mnt == prefix or mnt.startswith(prefix + "/"):
                out.append(mnt)
    return out


def sorted_copy(src: Path, dst: Path) -> None:
    """Copy a tree creating every directory's entries in name order (hard links kept,
    owners, modes, xattrs and device nodes too): mkfs -d then sees a fixed order."""
    seen: dict[tuple[int, int], Path] = {}

    def copy_meta(s: Path, d: Path, st: os.stat_result) -> None:
        os.chown(d, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(d, stat.S_IMODE(st.st_mode))
            for name in os.listxattr(s):
                os.setxattr(d, name, os.getxattr(s, name))

    def walk(s: Path, d: Path) -> None:
        for name in sorted(os.listdir(s)):
            sp, dp = s / name, d / name
            st = os.lstat(sp)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                dp.mkdir()
                walk(sp, dp)
                copy_meta(sp, dp, st)
                continue
            if st.st_nlink > 1 and not stat.S_ISLNK(mode):
                first = seen.get((st.st_dev, st.st_ino))
                if first is not None:
                    os.link(first, dp)
                    continue
                seen[(st.st_dev, st.st_ino)] = dp
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(sp), dp)
            elif stat.S_ISREG(mode):
                shutil.copyfile(sp, dp, follow_symlinks=False)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                os.mknod(dp, mode, st.st_rdev)
            else:
                continue  # sockets: nothing in an image needs one
            copy_meta(sp, dp, st)

    walk(src, dst)
    st = os.lstat(src)
    copy_meta(src, dst, st)


def _zstd_size(path: Path) -> int:
    with path.open("rb") as src:
        proc = subprocess.Popen(
            ["zstd", "-q", "-c", "-T0", "-3"], stdin=src, stdout=subprocess.PIPE
        )
        stdout = proc.stdout
        total = 0
        if stdout is not None:
            for chunk in iter(lambda: stdout.read(1 << 20), b""):
                total += len(chunk)
        if proc.wait() != 0:
            raise ImageBuildError("zstd failed")
    return total


def _copy_out(src: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pyenv.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(tmp)])
    os.replace(tmp, out)


def _from_cache(cache: Path, started: float, progress: Progress) -> Result | None:
    image, meta = cache / IMAGE_NAME, cache / "build.json"
    if not (image.is_file() and meta.is_file()):
        return None
    doc = json.loads(meta.read_text())
    os.utime(cache)  # recently used: prune_cache keeps it
    doc.update(path=image, cached=True, seconds=time.monotonic() - started)
    progress(f"cached: {image} (inputs {doc['key'][:12]})")
    return Result(**doc)


def _save_meta(cache: Path, result: Result) -> None:
    meta_doc = result.to_json()
    for transient in ("path", "cached", "seconds"):
        meta_doc.pop(transient)
    (cache / "build.json").write_text(json.dumps(meta_doc, indent=2) + "\n")


def build(
    inputs: Inputs,
    out: Path | None,
    *,
    rebuild: bool = False,
    keep_tree: Path | None = None,
    progress: Progress = lambda _msg: None,
) -> Result:
    """Build (or take from the cache) the base image; copy it to `out` when given."""
    started = time.monotonic()
    _check_inputs(inputs)
    if inputs.overlay is not None:
        result = _build_overlaid(inputs, rebuild, progress)
    else:
        epoch = inputs.epoch if inputs.epoch is not None else source_date_epoch()
        if inputs.sources_file is not None:
            sources_text = inputs.sources_file.read_text()
        else:
            sources_text = sources.host_sources(rootfs.SUITE)
        key = input_key(inputs, sources_text, epoch)
        cache = cache_root(inputs.source) / key[:32]
        cached = None if rebuild else _from_cache(cache, started, progress)
        if cached is not None:
            result = cached
        else:
            result = _build_fresh(inputs, sources_text, epoch, key, cache, keep_tree, progress)
            _save_meta(cache, result)
            prune_cache(cache.parent, keep={cache.name})
    result.seconds = time.monotonic() - started
    if out is not None:
        _copy_out(result.path, out)
        result.path = out
    return result


def _build_overlaid(inputs: Inputs, rebuild: bool, progress: Progress) -> Result:
    """The base image (built or cached), with the overlay laid over it; cached beside the
    base image, so pruning the base prunes its overlaid images too."""
    started = time.monotonic()
    overlay = inputs.overlay
    if overlay is None:
        raise ValueError("_build_overlaid needs an overlay")
    base = build(replace(inputs, overlay=None), None, rebuild=rebuild, progress=progress)
    key = overlay_mod.key(base.key, overlay)
    cache = base.path.parent / f"overlay-{key[:32]}"
    cached = None if rebuild else _from_cache(cache, started, progress)
    if cached is not None:
        return cached
    progress(f"laying {overlay} over the base image")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=cache))
    try:
        partial = cache / f".{IMAGE_NAME}.partial"
        t = time.monotonic()
        with _tmpfs(work / "stage", 4 << 30) as stage:
            raw = overlay_mod.make(
                base.path,
                overlay,
                partial,
                image_key=key,
                epoch=base.epoch,
                stage=stage,
                work=work,
                label=LABEL,
            )
        image = cache / IMAGE_NAME
        os.replace(partial, image)
        result = replace(
            base,
            path=image,
            key=key,
            cached=False,
            raw_bytes=raw,
            zstd_bytes=_zstd_size(image),
            sha256=_hash_file(image),
            stages={"base": base.seconds, "overlay": time.monotonic() - t},
        )
    finally:
        for mnt in reversed(_mounted(work)):
            subprocess.run(["umount", "--lazy", mnt], check=False, capture_output=True)
        if not _mounted(work):
            shutil.rmtree(work, ignore_errors=True)
    _save_meta(cache, result)
    return result


def prune_cache(root: Path, keep: set[str], entries: int = CACHE_KEEP) -> list[Path]:
    """Drop all but the `entries` newest images, wheel sets and Debian trees (by mtime):
    every change to the checkout makes a new key, and each image is hundreds of MiB."""
    removed: list[Path] = []
    for directory, pattern in ((root, "[0-9a-f]" * 32), (root / "wheels", "*")):
        found = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [p for p in found if p.name not in keep][max(0, entries - 1) :]:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    trees = sorted(
        (root / "debootstrap").glob("*.tar.zst"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for old in trees[entries:]:
        old.unlink(missing_ok=True)
        removed.append(old)
    return removed


def _debootstrap(
    tree: Path, list_file: Path, sources_text: str, epoch: int, cache: Path, progress: Progress
) -> None:
    """mmdebstrap's tree, or its cached copy: it depends only on the package set, the
    sources and the epoch, so a change to spk-visor does not download Debian again."""
    doc = {
        "format": FORMAT,
        "suite": rootfs.SUITE,
        "packages": rootfs.PACKAGES,
        "dpkg_exclude": rootfs.DPKG_EXCLUDE,
        "dpkg_include": rootfs.DPKG_INCLUDE,
        "sources": sources_text,
        "epoch": epoch,
    }
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
    archive = cache / "debootstrap" / f"{key}.tar.zst"
    tar = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]
    if archive.is_file():
        progress(f"Debian tree from the cache ({archive.name})")
        os.utime(archive)  # recently used: prune_cache keeps it
        tree.mkdir()
        pyenv.run([*tar, "-I", "zstd -T0", "-C", str(tree), "-xf", str(archive)])
        return
    rootfs.debootstrap(tree, list_file, epoch, progress)
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f".{archive.name}.partial")
    pyenv.run([*tar, "-I", "zstd -T0 -3", "-C", str(tree), "-cf", str(partial), "."])
    os.replace(partial, archive)


def _build_fresh(
    inputs: Inputs,
    sources_text: str,
    epoch: int,
    key: str,
    cache: Path,
    keep_tree: Path | None,
    progress: Progress,
) -> Result:
    cache.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="work-", dir=cache.parent))
    try:
        tree = work / "tree"
        list_file = work / "sources.sources"
        if sources_text.lstrip().startswith("deb "):
            list_file = work / "sources.list"
        list_file.write_text(sources_text)
        t = time.monotonic()
        _debootstrap(tree, list_file, sources_text, epoch, cache.parent, progress)
        stages["mmdebstrap"] = time.monotonic() - t

        t = time.monotonic()
        rootfs.node_files(tree, inputs.root_json.read_bytes(), inputs.vmm, inputs.vmm_firmware)
        wheels = cache.parent / "wheels" / key[:32]
        pyenv.build_wheels(inputs.source, wheels, progress)
        pyenv.install_cli(tree, wheels, progress)
        rid = pyenv.install_daemon(tree, inputs.daemon_tree, inputs.source / "smechvisord", VERSION)
        rootfs.services(tree)
        stages["customize"] = time.monotonic() - t

        t = time.monotonic()
        rootfs.prune(tree, epoch, progress)
        rootfs.recompile_python(tree, epoch)
        cli_version = pyenv.check_cli(tree)
        kernel = rootfs.kernel_version(tree)
        packages = rootfs.package_list(tree)
        sealed = rootfs.seal(tree, packages)
        found = rootfs.compilers(tree)
        if found:
            raise ImageBuildError(f"compilers left in the image: {', '.join(found)}")
        stages["prune_seal"] = time.monotonic() - t

        t = time.monotonic()
        progress("staging a sorted copy and making the ext4 image")
        partial = cache / f".{IMAGE_NAME}.partial"
        with _tmpfs(work / "stage", 4 << 30) as stage:
            sorted_copy(tree, stage)
            raw = ext4.make(stage, partial, key=key, epoch=epoch, work=work, label=LABEL)
        stages["mkfs"] = time.monotonic() - t
        if keep_tree is not None:
            shutil.move(tree, keep_tree)  # may be another filesystem
        image = cache / IMAGE_NAME
        os.replace(partial, image)
        t = time.monotonic()
        progress("measuring (sha256, zstd size)")
        result = Result(
            path=image,
            key=key,
            cached=False,
            raw_bytes=raw,
            zstd_bytes=_zstd_size(image),
            sha256=_hash_file(image),
            seconds=0.0,
            epoch=epoch,
            kernel=kernel,
            daemon_release=rid,
            spk_visor_version=cli_version,
            vmm=inputs.vmm is not None,
            sealed=sealed,
            stages=stages,
        )
        stages["measure"] = time.monotonic() - t
        return result
    finally:
        for mnt in reversed(_mounted(work)):
            subprocess.run(["umount", "--lazy", mnt], check=False, capture_output=True)
        # Never remove a tree that still has something mounted in it (a /dev bind).
        if not _mounted(work):
            shutil.rmtree(work, ignore_errors=True)
