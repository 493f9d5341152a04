"""Request body checks. Each failure is a 400 that names the field; nothing is touched first."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smechvisord import protocol as p
from smechvisord.errors import invalid


@dataclass(frozen=True)
class VmSpec:
    cpus: int
    memory_mb: int
    disk: Path
    name: str | None
    dry_run: bool


def only_keys(body: Mapping[str, Any], allowed: set[str], required: set[str]) -> None:
    for key in sorted(body):
        if key not in allowed:
            known = (
                f"allowed: {', '.join(sorted(allowed))}"
                if allowed
                else "this request takes no fields"
            )
            raise invalid(key, f"unknown field; {known}")
    for key in sorted(required):
        if key not in body:
            raise invalid(key, "required field is missing")


def integer(body: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = body[key]
    # bool is a subclass of int in Python; JSON `true` is not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(key, f"must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise invalid(key, f"must be between {low} and {high}, got {value}", min=low, max=high)
    return value


def boolean(body: Mapping[str, Any], key: str, default: bool | None = None) -> bool:
    if key not in body and default is not None:
        return default
    value = body[key]
    if not isinstance(value, bool):
        raise invalid(key, f"must be true or false, got {type(value).__name__}")
    return value


def vm_name(body: Mapping[str, Any]) -> str | None:
    if "name" not in body:
        return None
    value = body["name"]
    if not isinstance(value, str) or not p.VM_ID_RE.fullmatch(value):
        raise invalid(
            "name", "must be 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit"
        )
    if p.UNMANAGED_ID_RE.fullmatch(value):
        raise invalid(
            "name", "pid-N is the id of a VMM smechvisord did not start; choose another name"
        )
    return value


def disk_path(value: Any, image_dirs: tuple[Path, ...]) -> Path:
    """The disk must be an existing regular file inside an image dir once every symlink and
    `..` is resolved, so a request cannot hand the VMM a host disk or a file elsewhere."""
    if not isinstance(value, str) or not value:
        raise invalid("disk", "must be a non-empty path string")
    if "\0" in value or not value.startswith("/"):
        raise invalid("disk", "must be an absolute path")
    # The VMM's option syntax splits on ',' and treats '"' and '[' as quoting.
    if any(c in value for c in ',"[]='):
        raise invalid("disk", 'must not contain , " [ ] or =')
    try:
        resolved = Path(value).resolve(strict=True)
    except (OSError, RuntimeError):
        raise invalid("disk", f"no such file: {value}") from None
    roots = [d.resolve() for d in image_dirs]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise invalid(
            "disk",
            f"{value} is outside the image dirs ({':'.join(map(str, image_dirs))})",
            image_dirs=[str(d) for d in image_dirs],
        )
    mode = os.stat(resolved).st_mode
    if stat.S_ISBLK(mode):
        raise invalid("disk", f"{value} is a host block device; use an image file")
    if not stat.S_ISREG(mode):
        raise invalid("disk", f"{value} is not a regular file")
    return resolved


def create_vm(
    body: Mapping[str, Any], max_cpus: int, max_memory_mb: int, image_dirs: tuple[Path, ...]
) -> VmSpec:
    only_keys(
        body,
        allowed={p.KEY_CPUS, p.KEY_MEMORY_MB, p.KEY_DISK, p.KEY_NAME, p.KEY_DRY_RUN},
        required={p.KEY_CPUS, p.KEY_MEMORY_MB, p.KEY_DISK},
    )
    # Checked in this order so the error names the first field a form shows.
    cpus = integer(body, p.KEY_CPUS, 1, max_cpus)
    memory_mb = integer(body, p.KEY_MEMORY_MB, p.MIN_MEMORY_MB, max_memory_mb)
    name = vm_name(body)
    dry_run = boolean(body, p.KEY_DRY_RUN, default=False)
    disk = disk_path(body[p.KEY_DISK], image_dirs)
    return VmSpec(cpus=cpus, memory_mb=memory_mb, disk=disk, name=name, dry_run=dry_run)
