"""`spk-visor image build`: the SmechVisor base image (the work is in spk_visor.image)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from spk_visor.commands.common import JsonOpt, state
from spk_visor.errors import UsageError

app = typer.Typer(help="Build the SmechVisor base image (a raw ext4 root for an A/B slot).")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


@app.command("build")
def build(
    ctx: typer.Context,
    root: Annotated[
        Path,
        typer.Option(
            "--root",
            metavar="FILE",
            help="The OTA trust root (root.json) the node trusts from the factory.",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="FILE", help="Copy the image here [default: cache]."),
    ] = None,
    vmm: Annotated[
        Path | None,
        typer.Option(
            "--vmm",
            metavar="PATH",
            help="A cloud-hypervisor binary to include; without it the node cannot create VMs.",
        ),
    ] = None,
    vmm_firmware: Annotated[
        Path | None,
        typer.Option("--vmm-firmware", metavar="PATH", help="The VMs' firmware (CLOUDHV.fd)."),
    ] = None,
    daemon_tree: Annotated[
        Path | None,
        typer.Option(
            "--daemon-tree",
            metavar="DIR",
            help="The smechvisord release tree (make dist) [default: built from this checkout].",
        ),
    ] = None,
    sources: Annotated[
        Path | None,
        typer.Option(
            "--sources",
            metavar="FILE",
            help="apt sources for Debian 12 [default: this machine's apt sources].",
        ),
    ] = None,
    overlay: Annotated[
        Path | None,
        typer.Option(
            "--overlay",
            metavar="DIR",
            help="Files laid over the built image (extra health.d checks, site settings); "
            "the base image is reused from the cache.",
        ),
    ] = None,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Build even when the cache has this image.")
    ] = False,
    keep_tree: Annotated[
        Path | None,
        typer.Option("--keep-tree", metavar="DIR", help="Keep the image's tree here (debugging)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build the base image from Debian 12 packages (needs root; cached by its inputs)."""
    from spk_visor.image import build as image_build  # noqa: PLC0415 (heavy imports)

    st = state(ctx, as_json)
    if keep_tree is not None and keep_tree.exists():
        raise UsageError(f"--keep-tree {keep_tree} exists", "name a directory that does not")
    if out is not None:
        _check_out(out)
    source = image_build.checkout()
    inputs = image_build.Inputs(
        source=source,
        root_json=image_build.trust_root(root),
        vmm=vmm,
        vmm_firmware=vmm_firmware,
        daemon_tree=daemon_tree,
        sources_file=sources,
        epoch=None,
        overlay=overlay,
    )

    def progress(message: str) -> None:
        if not st.json:
            st.console.error(message)

    result = image_build.build(inputs, out, rebuild=rebuild, keep_tree=keep_tree, progress=progress)
    if st.json:
        st.console.json(result.to_json())
        return
    how = "cached" if result.cached else f"built in {result.seconds:.0f} s"
    st.console.print(
        f"{result.path}: {_mib(result.raw_bytes)} raw, {_mib(result.zstd_bytes)} zstd, "
        f"sha256 {result.sha256} ({how})"
    )
    if not result.vmm:
        st.console.error(
            "note: no --vmm: the node reports create_vm false until cloud-hypervisor is added"
        )


def _check_out(out: Path) -> None:
    """Before a build of minutes: --out must be a file name in a folder that exists and
    may be written, or the image would be lost at the end."""
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder", "give the image's file name, e.g. base.img")
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: the folder {folder} does not exist", f"mkdir -p {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the folder {folder} is not writable by this user")
