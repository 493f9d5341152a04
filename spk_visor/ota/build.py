"""The build side: a daemon release tree and/or a base image into a signed `.spkb` bundle.

The tree becomes a "pack" blob, the plain concatenation of its files in manifest order
(no tar, no per-file headers: the signed manifest holds every path, mode, size and hash).
The image becomes a zstd blob; the manifest pins both the blob and the raw image hash.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from spk_visor import new_folder
from spk_visor.errors import UsageError
from spk_visor.ota import bundle
from spk_visor.trust import dsse, manifest
from spk_visor.trust.keys import SigningKey
from spk_visor.trust.roots import format_time

CHUNK = 4 << 20
ZSTD_LEVEL = 3
# What a node runs from a release tree (the OpenRC script starts current/bin/smechvisord;
# the swap's preflight runs it with --self-check), and where the tree says which version it
# is: the daemon's own version.py, which /api/health reports and probation compares with
# the manifest's version.
LAUNCHER = "bin/smechvisord"
VERSION_FILE = "lib/smechvisord/version.py"
_MAX_VERSION_FILE = 64 * 1024
Progress = Callable[[int], None]


@dataclass
class Blob:
    id: str
    size: int
    path: Path


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan_tree(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Files and symlinks of a release tree, sorted, checked against the manifest rules."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    files: list[dict[str, Any]] = []
    links: list[dict[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Bytecode (__pycache__, compiled with --invalidation-mode checked-hash) is part of
        # the release like any file: the node runs Python with -B and never writes it.
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(Path(dirpath, d))]:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            try:
                manifest.check_path(rel, str(root))
            except Exception as e:
                raise UsageError(f"{path}: name not allowed in a release tree", str(e)) from e
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                links.append({"p": rel, "t": target})
            elif stat.S_ISREG(st.st_mode):
                files.append({"p": rel, "m": stat.S_IMODE(st.st_mode) & manifest.MODE_MASK})
            else:
                raise UsageError(f"{path}: only regular files and symlinks can be released")
    files.sort(key=lambda f: f["p"])
    links.sort(key=lambda s: s["p"])
    return files, links


def tree_version(root: Path) -> str | None:
    """The VERSION string that the tree's version.py assigns (read, never run), or None."""
    try:
        with (root / VERSION_FILE).open("rb") as f:
            source = f.read(_MAX_VERSION_FILE)
        module = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in module.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "VERSION" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    return None


def check_release_tree(root: Path, version: str) -> None:
    """Refuse (exit 2) a daemon tree that every node would roll back in preflight or
    probation: no executable launcher, or a version other than the release's."""
    launcher = root / LAUNCHER
    hint = "build the release tree from the checkout with `make dist`"
    try:
        st = launcher.stat()
        inside = launcher.resolve().is_relative_to(root.resolve())
    except OSError:
        raise UsageError(
            f"{root} has no {LAUNCHER}: nodes would have nothing to run", hint
        ) from None
    if not inside:
        raise UsageError(f"{launcher} points outside the tree", hint)
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IXUSR:
        raise UsageError(
            f"{launcher} is not an executable file: nodes could not start it",
            f"chmod 755 {launcher}, or {hint}",
        )
    found = tree_version(root)
    if found is None:
        raise UsageError(
            f'{root} does not say its version: {VERSION_FILE} with VERSION = "{version}" '
            "is missing",
            hint,
        )
    if found != version:
        raise UsageError(
            f"the tree is smechvisord {found} ({VERSION_FILE}), but --version is {version}: "
            "nodes would roll it back when its health check reports the wrong version",
            f"give --version {found}, or build the tree for {version}",
        )


def pack_tree(root: Path, out_dir: Path) -> tuple[dict[str, Any], Blob]:
    """Write the pack blob of `root` into out_dir; return the manifest `tree` and the blob."""
    files, links = scan_tree(root)
    pack_hash = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".pack-")
    size = 0
    with os.fdopen(fd, "wb") as out:
        for entry in files:
            file_hash = hashlib.sha256()
            n = 0
            with (root / entry["p"]).open("rb") as f:
                while chunk := f.read(CHUNK):
                    file_hash.update(chunk)
                    pack_hash.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
            entry["s"] = n
            entry["h"] = file_hash.hexdigest()
            size += n
    blob_id = f"sha256:{pack_hash.hexdigest()}"
    final = out_dir / pack_hash.hexdigest()
    os.replace(tmp, final)
    tree = {"pack": blob_id, "encoding": "identity", "files": files, "symlinks": links}
    return tree, Blob(blob_id, size, final)


def encode_image(
    image: Path, out_dir: Path, progress: Progress | None = None
) -> tuple[dict[str, Any], Blob]:
    """zstd-encode a raw image, hashing raw and encoded bytes in the same pass."""
    if not image.is_file():
        raise UsageError(f"{image} is not a file (a raw ext4 filesystem image is expected)")
    raw_hash = hashlib.sha256()
    blob_hash = hashlib.sha256()
    raw_size = 0

    class _Hashing:
        """Write target that hashes what the compressor emits."""

        def __init__(self, f: Any) -> None:
            self.f = f
            self.n = 0

        def write(self, data: bytes) -> int:
            blob_hash.update(data)
            self.f.write(data)
            self.n += len(data)
            return len(data)

    # threads=-1: one worker per core; multi-GB images are the common case.
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".image-")
    with os.fdopen(fd, "wb") as f, image.open("rb") as src:
        sink = _Hashing(f)
        with compressor.stream_writer(sink, closefd=False) as writer:  # type: ignore[arg-type]
            while chunk := src.read(CHUNK):
                raw_hash.update(chunk)
                writer.write(chunk)
                raw_size += len(chunk)
                if progress:
                    progress(len(chunk))
        size = sink.n
    final = out_dir / blob_hash.hexdigest()
    os.replace(tmp, final)
    blob_id = f"sha256:{blob_hash.hexdigest()}"
    spec = {
        "blob": blob_id,
        "encoding": "zstd",
        "raw_size": raw_size,
        "raw_sha256": raw_hash.hexdigest(),
    }
    return spec, Blob(blob_id, size, final)


@dataclass
class BuildResult:
    bundle: Path
    manifest_path: Path
    manifest_sha256: str
    payload: dict[str, Any]
    blobs: list[Blob]


def make_manifest(
    *,
    version: str,
    counter: int,
    set_floor: int,
    tree: dict[str, Any] | None,
    image: dict[str, Any] | None,
    blobs: Sequence[Blob],
    compatible: Sequence[str] = ("smechvisor/x86_64",),
    dev: bool = False,
    base_counter_min: int = 0,
    probation_s: float = 30,
    created: dt.datetime | None = None,
) -> dict[str, Any]:
    components: dict[str, Any] = {}
    if tree is not None:
        components["smechvisord"] = {
            "class": "daemon",
            "version": version,
            "service": "smechvisord",
            "requires_base": {"counter_min": base_counter_min},
            "tree": tree,
            "preflight": {"argv": ["bin/smechvisord", "--self-check"], "timeout_s": 20},
            "health": {
                "timeout_s": 3,
                "probation_s": probation_s,
                "interval_s": 1,
                "max_pid_changes": 1,
            },
            "rollback_safe": True,
        }
    if image is not None:
        components["base"] = {"class": "image", "version": version, "image": image}
    return {
        "type": manifest.MANIFEST_TYPE,
        "product": manifest.PRODUCT,
        "compatible": list(compatible),
        "dev": dev,
        "created": format_time(created or dt.datetime.now(dt.UTC)),
        "release": {"version": version, "counter": counter, "set_floor": set_floor},
        "requires": {"agent_min": "0.1.0", "features": []},
        "components": components,
        "blobs": [{"id": b.id, "size": b.size} for b in blobs],
    }


def sign_manifest(payload: dict[str, Any], keys: Sequence[SigningKey]) -> dsse.Envelope:
    manifest.parse(payload)  # never sign what a node would refuse
    env = dsse.new(dsse.MANIFEST_TYPE, payload)
    for key in keys:
        env.sign(key)
    return env


def build(
    *,
    out: Path,
    version: str,
    counter: int,
    keys: Sequence[SigningKey],
    daemon_tree: Path | None = None,
    base_image: Path | None = None,
    set_floor: int = 0,
    roots: Sequence[dsse.Envelope] = (),
    dev: bool = False,
    base_counter_min: int = 0,
    probation_s: float = 30,
    progress: Progress | None = None,
    check_tree: bool = True,
) -> BuildResult:
    """Build `out` (a .spkb file) and `out` with .manifest.json beside it.

    `check_tree=False` skips check_release_tree: for tests that need a release nodes
    must roll back."""
    if not manifest.timeout_ok(probation_s):  # nodes would refuse the manifest (exit 3)
        raise UsageError(
            f"--probation {probation_s:g}: must be more than 0 and at most "
            f"{manifest.MAX_TIMEOUT_S} seconds",
            "for example --probation 30 (the default)",
        )
    if daemon_tree is None and base_image is None:
        raise UsageError("nothing to build", "give --daemon-tree and/or --base-image")
    if not keys:
        raise UsageError("no release key", "give --key (repeat it for a threshold above 1)")
    if out.is_dir():
        raise UsageError(
            f"{out} is a folder; the bundle is one file",
            f"give the bundle's file name, e.g. --out {out / f'spk-{version}.spkb'}",
        )
    new_folder.check(out.parent, f"--out {out}")
    if daemon_tree is not None and check_tree:
        scan_tree(daemon_tree)  # names and file types first: the clearest error
        check_release_tree(daemon_tree, version)
    new_folder.make(out.parent, f"--out {out}")
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=".spk-build-"))
    try:
        blobs: list[Blob] = []
        tree = image = None
        if daemon_tree is not None:
            tree, pack = pack_tree(daemon_tree, work)
            blobs.append(pack)
        if base_image is not None:
            image, blob = encode_image(base_image, work, progress)
            if blob.id not in {b.id for b in blobs}:
                blobs.append(blob)
        payload = make_manifest(
            version=version,
            counter=counter,
            set_floor=set_floor,
            tree=tree,
            image=image,
            blobs=blobs,
            dev=dev,
            base_counter_min=base_counter_min,
            probation_s=probation_s,
        )
        env = sign_manifest(payload, keys)
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            with tmp.open("wb") as f:
                bundle.write(f, env, roots, [b.path for b in blobs])
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        manifest_path = out.with_name(out.name.removesuffix(".spkb") + ".manifest.json")
        manifest_path.write_bytes(env.to_bytes())
        return BuildResult(out, manifest_path, env.payload_sha256, payload, blobs)
    finally:
        for entry in work.iterdir():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        work.rmdir()
