"""A node for the base-class (A/B slot) tests, and a worker that runs one step of it.

Builders (used in-process by the tests and the benchmark):
    node(dir, slot_a, slot_b)       a sysroot with ota.conf, grubenv and /proc/cmdline
    ext4_image(path, marker)        a small real ext4 filesystem image holding a marker
    publish(ctx, raw, ...)          zstd-encode the image into the store, return a Manifest

Worker (a separate process, so a crash point's SIGKILL takes down only it):
    SPK_VISOR_OTA_SYSROOT=... [SPK_VISOR_OTA_CRASH_AT=base:writing] \
        python -m tests.support.ota_slots_worker stage PAYLOAD.json
    ... ota_slots_worker recover | boot-check | discard
It prints one JSON line ({"exit": n, ...}) and exits with the step's exit code.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from spk_visor.errors import SpkVisorError
from spk_visor.ota import slots
from spk_visor.ota.context import OtaContext, load_context
from spk_visor.ota.nodeconf import NodePaths, load_config
from spk_visor.trust.manifest import MANIFEST_TYPE, Manifest, parse

ENTRY_A = "smechvisor-a"
ENTRY_B = "smechvisor-b"


def grubenv_path(sysroot: Path) -> Path:
    return sysroot / "boot" / "grub" / "grubenv"


def node(sysroot: Path, slot_a: str, slot_b: str, booted: str = "a") -> OtaContext:
    """A node booted from `booted`, default entry = that slot, no one-shot pending."""
    conf = sysroot / "etc" / "spk-visor" / "ota.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    env = grubenv_path(sysroot)
    conf.write_text(
        "[slots]\n"
        f'a = "{slot_a}"\n'
        f'b = "{slot_b}"\n'
        f'grubenv = "{env}"\n'
        f'entry_a = "{ENTRY_A}"\n'
        f'entry_b = "{ENTRY_B}"\n'
    )
    env.parent.mkdir(parents=True, exist_ok=True)
    editenv(env, "create")
    editenv(env, "set", f"saved_entry={ENTRY_A if booted == 'a' else ENTRY_B}")
    set_booted(sysroot, booted)
    paths = NodePaths(sysroot)
    return OtaContext(paths, load_config(paths))


def set_booted(sysroot: Path, slot: str) -> None:
    """What the kernel command line of a boot from `slot` says."""
    cmdline = sysroot / "proc" / "cmdline"
    cmdline.parent.mkdir(parents=True, exist_ok=True)
    cmdline.write_text(
        f"BOOT_IMAGE=/vmlinuz root=PARTLABEL=root-{slot} ro smechvisor.slot={slot}\n"
    )


def editenv(env: Path, *args: str) -> str:
    done = subprocess.run(
        ["grub-editenv", str(env), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout


def grub_vars(sysroot: Path) -> dict[str, str]:
    out = {}
    for line in editenv(grubenv_path(sysroot), "list").splitlines():
        key, _, value = line.partition("=")
        out[key] = value
    return out


def consume_oneshot(sysroot: Path) -> str | None:
    """Boot as GRUB does: take next_entry (else saved_entry) and clear next_entry."""
    env = grub_vars(sysroot)
    chosen = env.get("next_entry") or env.get("saved_entry")
    editenv(grubenv_path(sysroot), "unset", "next_entry")
    return chosen


def ext4_image(path: Path, marker: str, size_mib: int = 16) -> Path:
    """A real ext4 filesystem image whose /release.txt holds `marker`."""
    content = path.with_suffix(".d")
    content.mkdir(parents=True, exist_ok=True)
    (content / "release.txt").write_text(marker + "\n")
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(content), str(path), f"{size_mib}M"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Published:
    payload: dict[str, Any]
    manifest: Manifest
    manifest_hex: str
    blob_id: str
    raw_sha256: str
    raw_size: int

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.payload, sort_keys=True))
        return path


def encode(raw: Path, out: Path, level: int = 3, threads: int = 0) -> Path:
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    with raw.open("rb") as src, out.open("wb") as dst:
        cctx.copy_stream(src, dst, read_size=1 << 22, write_size=1 << 22)
    return out


def publish(
    ctx: OtaContext,
    raw: Path,
    version: str = "2.5.0",
    counter: int = 2050000,
    set_floor: int = 2040000,
    raw_size: int | None = None,
    raw_sha256: str | None = None,
    encoded: Path | None = None,
) -> Published:
    """Put the zstd-encoded `raw` into the node's store and describe it in a manifest.

    `raw_size`/`raw_sha256` override what the manifest claims (for refusal tests).
    """
    blob = encoded or raw.with_suffix(".zst")
    if not blob.exists():  # encoded once per image: the tests publish the same ones often
        encode(raw, blob)
    blob_hex = sha256_file(blob)
    blob_id = f"sha256:{blob_hex}"
    size = blob.stat().st_size
    if not ctx.store.has(blob_id, size):
        with blob.open("rb") as f:
            ctx.store.ingest(f, blob_id, size)
    claimed_size = raw.stat().st_size if raw_size is None else raw_size
    claimed_sha = raw_sha256 or sha256_file(raw)
    image = {
        "blob": blob_id,
        "encoding": "zstd",
        "raw_size": claimed_size,
        "raw_sha256": claimed_sha,
    }
    payload: dict[str, Any] = {
        "type": MANIFEST_TYPE,
        "product": "smechvisor",
        "compatible": ["smechvisor/x86_64"],
        "created": "2026-09-01T10:00:00Z",
        "release": {"version": version, "counter": counter, "set_floor": set_floor},
        "components": {"base": {"class": "image", "version": version, "image": image}},
        "blobs": [{"id": blob_id, "size": size}],
    }
    manifest_hex = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return Published(payload, parse(payload), manifest_hex, blob_id, claimed_sha, claimed_size)


def main(argv: list[str]) -> int:
    action = argv[0]
    ctx = load_context()
    try:
        if action == "stage":
            payload = json.loads(Path(argv[1]).read_text())
            manifest_hex = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
            code = int(slots.stage(ctx, parse(payload), manifest_hex))
            print(json.dumps({"exit": code}))
        elif action == "recover":
            done = slots.recover(ctx)
            print(json.dumps({"exit": 0, "actions": done}))
            code = 0
        elif action == "boot-check":
            code = int(slots.boot_check(ctx))
            print(json.dumps({"exit": code}))
        elif action == "discard":
            code = int(slots.discard(ctx))
            print(json.dumps({"exit": code}))
        else:
            print(f"unknown action {action}", file=sys.stderr)
            return 2
    except SpkVisorError as e:
        print(json.dumps({"exit": int(e.exit_code), "error": e.message}))
        return int(e.exit_code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
