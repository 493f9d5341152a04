"""The manifest schema (ota.md, "Schemas") and the rules every path and mode obeys.

`parse` takes the payload of a manifest envelope whose signatures already verified and
returns typed, validated objects. Everything the node later installs is pinned here: each
file of a daemon tree by size and sha256, the base image by its encoded blob and raw hash.
Unknown keys are ignored (forward compatibility); unknown required features are refused.
Types are strict: a signed field of the wrong type is a refusal (VerificationError, exit 3)
like any other, never a crash in a later int() or bool(). Symlinks are resolved the way
the kernel would in the installed tree, chains included, and must stay inside it.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Any

from spk_visor.errors import VerificationError

MANIFEST_TYPE = "spk-visor-ota.manifest/v1"
PRODUCT = "smechvisor"
# Features this agent implements; a manifest requiring anything else is refused.
FEATURES: frozenset[str] = frozenset()
# Always used with fullmatch: `$` alone also matches before a final newline ("bin/x\n").
PATH_RE = re.compile(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")
COMPONENT_RE = re.compile(r"[A-Za-z0-9._+-]+")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
HEX64_RE = re.compile(r"[0-9a-f]{64}")
BLOB_RE = re.compile(r"sha256:[0-9a-f]{64}")
# Symlinks followed while resolving one path before it counts as a loop (Linux: 40).
MAX_LINK_HOPS = 40
MODE_MASK = 0o755
MAX_FILES = 100_000
MAX_BLOBS = 64
IMAGE_ENCODINGS = ("zstd", "identity")
# Sanity bounds on what a manifest may claim: 1 TiB per blob or image.
MAX_SIZE = 1 << 40


def _fail(what: str) -> VerificationError:
    return VerificationError(f"manifest rejected: {what}", "the bundle is not a valid release")


def _get(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _fail(f"{where}{key} is missing or of the wrong type")
    return value


def _size(doc: dict[str, Any], key: str, where: str) -> int:
    value = _get(doc, key, int, where)
    if not 0 <= value <= MAX_SIZE:
        raise _fail(f"{where}{key} is out of range")
    return int(value)


def _hex(doc: dict[str, Any], key: str, where: str) -> str:
    value = _get(doc, key, str, where)
    if not HEX64_RE.fullmatch(value):
        raise _fail(f"{where}{key} is not a sha256 hex digest")
    return str(value)


def _blob_id(doc: dict[str, Any], key: str, where: str) -> str:
    value = _get(doc, key, str, where)
    if not BLOB_RE.fullmatch(value):
        raise _fail(f"{where}{key} is not a blob id (sha256:<hex>)")
    return str(value)


def check_path(path: str, where: str) -> str:
    """A relative path of plain components: no `..`, no `.`, no absolute, no empty."""
    if CONTROL_RE.search(path):
        raise _fail(f"{where}: unsafe path {path!r} (control character)")
    if not PATH_RE.fullmatch(path) or any(part in (".", "..") for part in path.split("/")):
        raise _fail(f"{where}: unsafe path {path!r}")
    return path


def _optional(doc: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    """`doc[key]` when present (of exactly `kind`), else `default`."""
    if key not in doc:
        return default
    value = doc[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _fail(f"{where}{key} is of the wrong type (expected {kind.__name__})")
    return value


def _count(doc: dict[str, Any], key: str, where: str) -> int:
    """An optional integer >= 0 (default 0)."""
    value = _optional(doc, key, int, 0, where)
    if not 0 <= value <= MAX_SIZE:
        raise _fail(f"{where}{key} must be an integer >= 0")
    return int(value)


@dataclass(frozen=True)
class FileEntry:
    path: str
    mode: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True)
class Health:
    argv: tuple[str, ...]
    timeout_s: float
    probation_s: float
    interval_s: float
    max_pid_changes: int


@dataclass(frozen=True)
class DaemonComponent:
    name: str
    version: str
    service: str
    base_counter_min: int
    pack: str  # blob id of the concatenated file contents
    files: tuple[FileEntry, ...]
    symlinks: tuple[Symlink, ...]
    preflight: Command | None
    health: Health
    rollback_safe: bool

    @property
    def tree_size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class ImageComponent:
    name: str
    version: str
    blob: str
    encoding: str
    raw_size: int
    raw_sha256: str


@dataclass(frozen=True)
class Release:
    version: str
    counter: int
    set_floor: int


@dataclass(frozen=True)
class Manifest:
    product: str
    compatible: tuple[str, ...]
    dev: bool
    created: str
    release: Release
    agent_min: str
    features: tuple[str, ...]
    daemon: DaemonComponent | None
    image: ImageComponent | None
    blobs: dict[str, int]  # blob id -> size, in bundle order

    @property
    def blob_order(self) -> list[str]:
        return list(self.blobs)


def _argv(doc: dict[str, Any], where: str) -> tuple[str, ...]:
    argv = _get(doc, "argv", list, where)
    if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise _fail(f"{where}argv must be a non-empty list of strings")
    # argv[0] runs from inside the release tree, so it must be a tree path.
    check_path(argv[0], f"{where}argv[0]")
    return tuple(argv)


# The longest a manifest's health timeouts (timeout_s, probation_s, interval_s) and a
# preflight's may be: a node refuses a manifest with more, or with 0 or less.
MAX_TIMEOUT_S = 3600


def timeout_ok(value: object) -> bool:
    """Whether `value` is a number of seconds a manifest may carry: in (0, MAX_TIMEOUT_S]."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0 < value <= MAX_TIMEOUT_S
    )


def _timeout(doc: dict[str, Any], key: str, where: str, default: float) -> float:
    value = doc.get(key, default)
    if not timeout_ok(value):
        raise _fail(f"{where}{key} must be a number of seconds in (0, {MAX_TIMEOUT_S}]")
    return float(value)


def _symlink_target(link: str, target: str, where: str) -> None:
    """The target's own form: relative, plain components, no control characters."""
    if CONTROL_RE.search(target):
        raise _fail(f"{where}: symlink {link!r} -> {target!r} has a control character")
    if target.startswith("/") or not target:
        raise _fail(f"{where}: symlink {link!r} -> {target!r} must be relative")
    for part in target.split("/"):
        if part not in (".", "..") and not COMPONENT_RE.fullmatch(part):
            raise _fail(f"{where}: symlink {link!r} -> {target!r} has an unsafe component")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(link), target))
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        raise _fail(f"{where}: symlink {link!r} -> {target!r} escapes the tree")


def resolve_in_tree(path: str, links: dict[str, str]) -> list[str] | None:
    """Where `path` leads in a tree whose symlinks are `links` (path -> target), following
    every link on the way as the kernel does: a link's target is read relative to the
    directory the link sits in, *after* the links before it were followed, so `..` after a
    link to `.` climbs from where the link led, not from where its name is. The resolved
    components, or None when the walk leaves the tree (`..` above its root). ValueError
    for a loop (more than MAX_LINK_HOPS links)."""
    resolved: list[str] = []
    pending = list(reversed(path.split("/")))
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return None
            resolved.pop()
            continue
        target = links.get("/".join([*resolved, part]))
        if target is None:
            resolved.append(part)
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            raise ValueError(f"more than {MAX_LINK_HOPS} symlinks")
        if target.startswith("/"):
            return None
        pending.extend(reversed(target.split("/")))
    return resolved


def _symlinks_stay_inside(symlinks: list[Symlink], where: str) -> None:
    links = {s.path: s.target for s in symlinks}
    for link in symlinks:
        try:
            resolved = resolve_in_tree(link.path, links)
        except ValueError as e:
            raise _fail(f"{where}: symlink {link.path!r} is part of a loop ({e})") from None
        if resolved is None:
            raise _fail(
                f"{where}: symlink {link.path!r} -> {link.target!r} escapes the tree "
                "(followed through the tree's other symlinks)"
            )


def _daemon(name: str, doc: dict[str, Any]) -> DaemonComponent:
    w = f"components.{name}."
    tree = _get(doc, "tree", dict, w)
    encoding = _optional(tree, "encoding", str, "identity", w + "tree.")
    if encoding != "identity":
        raise _fail(f"{w}tree.encoding {encoding!r} is not supported")
    raw_files = _get(tree, "files", list, w + "tree.")
    if len(raw_files) > MAX_FILES:
        raise _fail(f"{w}tree lists more than {MAX_FILES} files")
    files: list[FileEntry] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw_files):
        if not isinstance(entry, dict):
            raise _fail(f"{w}tree.files[{i}] is not an object")
        path = check_path(_get(entry, "p", str, f"{w}tree.files[{i}]."), f"{w}tree.files")
        mode = _get(entry, "m", int, f"{w}tree.files[{i}].")
        if not 0 <= mode <= 0o7777:
            raise _fail(f"{w}tree.files[{i}].m is not a file mode")
        mode &= MODE_MASK
        files.append(
            FileEntry(
                path, mode, _size(entry, "s", f"{w}files[{i}]."), _hex(entry, "h", f"{w}[{i}].")
            )
        )
        if path in seen:
            raise _fail(f"{w}tree lists {path!r} twice")
        seen.add(path)
    symlinks: list[Symlink] = []
    for i, entry in enumerate(_optional(tree, "symlinks", list, [], w + "tree.")):
        if not isinstance(entry, dict):
            raise _fail(f"{w}tree.symlinks[{i}] is not an object")
        path = check_path(_get(entry, "p", str, f"{w}symlinks[{i}]."), f"{w}tree.symlinks")
        target = _get(entry, "t", str, f"{w}symlinks[{i}].")
        _symlink_target(path, target, f"{w}tree.symlinks")
        if path in seen:
            raise _fail(f"{w}tree lists {path!r} twice")
        seen.add(path)
        symlinks.append(Symlink(path, target))
    # A file may not sit below another entry (a file or a symlink used as a directory):
    # that is how a symlinked directory would smuggle a write outside the tree.
    for path in seen:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise _fail(f"{w}tree: {path!r} lies below another entry")
    _symlinks_stay_inside(symlinks, f"{w}tree.symlinks")
    health_doc = _get(doc, "health", dict, w)
    pid_changes = health_doc.get("max_pid_changes", 1)
    if not isinstance(pid_changes, int) or isinstance(pid_changes, bool) or pid_changes < 0:
        raise _fail(f"{w}health.max_pid_changes must be an integer >= 0")
    health = Health(
        argv=_argv(health_doc, w + "health.") if "argv" in health_doc else (),
        timeout_s=_timeout(health_doc, "timeout_s", w + "health.", 3),
        probation_s=_timeout(health_doc, "probation_s", w + "health.", 30),
        interval_s=_timeout(health_doc, "interval_s", w + "health.", 3),
        max_pid_changes=pid_changes,
    )
    preflight = None
    if "preflight" in doc:
        pre = _get(doc, "preflight", dict, w)
        preflight = Command(_argv(pre, w + "preflight."), _timeout(pre, "timeout_s", w, 20))
    requires_base = _optional(doc, "requires_base", dict, {}, w)
    service = _get(doc, "service", str, w)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", service):
        raise _fail(f"{w}service {service!r} is not a service name")
    rollback_safe = _optional(doc, "rollback_safe", bool, True, w)
    return DaemonComponent(
        name=name,
        version=_get(doc, "version", str, w),
        service=service,
        base_counter_min=_count(requires_base, "counter_min", w + "requires_base."),
        pack=_blob_id(tree, "pack", w + "tree."),
        files=tuple(files),
        symlinks=tuple(symlinks),
        preflight=preflight,
        health=health,
        rollback_safe=rollback_safe,
    )


def _image(name: str, doc: dict[str, Any]) -> ImageComponent:
    w = f"components.{name}."
    image = _get(doc, "image", dict, w)
    encoding = _get(image, "encoding", str, w + "image.")
    if encoding not in IMAGE_ENCODINGS:
        raise _fail(f"{w}image.encoding {encoding!r} is not one of {IMAGE_ENCODINGS}")
    return ImageComponent(
        name=name,
        version=_get(doc, "version", str, w),
        blob=_blob_id(image, "blob", w + "image."),
        encoding=encoding,
        raw_size=_size(image, "raw_size", w + "image."),
        raw_sha256=_hex(image, "raw_sha256", w + "image."),
    )


def parse(doc: Any) -> Manifest:
    """Validate a manifest payload (already signature-checked) into a Manifest."""
    if not isinstance(doc, dict) or doc.get("type") != MANIFEST_TYPE:
        raise _fail(f"type is not {MANIFEST_TYPE}")
    release_doc = _get(doc, "release", dict, "")
    counter = _size(release_doc, "counter", "release.")
    set_floor = release_doc.get("set_floor", 0)
    if not isinstance(set_floor, int) or isinstance(set_floor, bool) or set_floor < 0:
        raise _fail("release.set_floor must be an integer >= 0")
    if set_floor > counter:
        raise _fail(f"release.set_floor {set_floor} is above its own counter {counter}")
    requires = _optional(doc, "requires", dict, {}, "")
    features = requires.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise _fail("requires.features must be a list of strings")
    compatible = _get(doc, "compatible", list, "")
    if not all(isinstance(c, str) for c in compatible):
        raise _fail("compatible must be a list of strings")
    raw_blobs = _get(doc, "blobs", list, "")
    if len(raw_blobs) > MAX_BLOBS:
        raise _fail(f"more than {MAX_BLOBS} blobs")
    blobs: dict[str, int] = {}
    for i, entry in enumerate(raw_blobs):
        if not isinstance(entry, dict):
            raise _fail(f"blobs[{i}] is not an object")
        blob_id = _blob_id(entry, "id", f"blobs[{i}].")
        if blob_id in blobs:
            raise _fail(f"blob {blob_id} is listed twice")
        blobs[blob_id] = _size(entry, "size", f"blobs[{i}].")
    daemon: DaemonComponent | None = None
    image: ImageComponent | None = None
    components = _get(doc, "components", dict, "")
    for name, comp in components.items():
        if not isinstance(comp, dict):
            raise _fail(f"components.{name} is not an object")
        kind = comp.get("class")
        if kind == "daemon" and daemon is None:
            daemon = _daemon(name, comp)
        elif kind == "image" and image is None:
            image = _image(name, comp)
        else:
            raise _fail(f"components.{name}: unsupported or repeated class {kind!r}")
    if daemon is None and image is None:
        raise _fail("no components")
    if daemon is not None:
        if daemon.pack not in blobs:
            raise _fail(f"daemon pack {daemon.pack} is not among the blobs")
        if blobs[daemon.pack] != daemon.tree_size:
            raise _fail("daemon pack size differs from the sum of its file sizes")
    if image is not None and image.blob not in blobs:
        raise _fail(f"image blob {image.blob} is not among the blobs")
    if image is not None and image.encoding == "identity" and blobs[image.blob] != image.raw_size:
        raise _fail("identity-encoded image blob size differs from raw_size")
    return Manifest(
        product=_get(doc, "product", str, ""),
        compatible=tuple(compatible),
        dev=_optional(doc, "dev", bool, False, ""),
        created=_optional(doc, "created", str, "", ""),
        release=Release(_get(release_doc, "version", str, "release."), counter, set_floor),
        agent_min=_optional(requires, "agent_min", str, "0", "requires."),
        features=tuple(features),
        daemon=daemon,
        image=image,
        blobs=blobs,
    )


def version_tuple(version: str) -> tuple[int, ...]:
    """ "1.2.10" -> (1, 2, 10); anything non-numeric sorts as 0 in its place."""
    out = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        out.append(int(digits.group()) if digits else 0)
    return tuple(out)
