"""The root of `spk-visor`: global options, one sub-app per group, errors -> exit codes."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated

import typer

from smechvisord.version import VERSION
from spk_visor import typer_fast
from spk_visor.commands import (
    about,
    deploy,
    image,
    iommu,
    node,
    ota,
    pci,
    reboot_uefi,
    sealed,
    vfio,
    vm,
)
from spk_visor.commands.common import AppState, Options
from spk_visor.errors import ExitCode, SpkVisorError, redact
from spk_visor.output import Console

app = typer.Typer(
    name="spk-visor",
    help="Manage SmechVisor nodes: host facts, VMs, IOMMU/VFIO, firmware setup, updates.",
    no_args_is_help=True,
    # Locals in tracebacks may hold tokens and keys (EXAMPLES.md D.20).
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"spk-visor {VERSION}")
        raise typer.Exit(0)


_verbose = False


@app.callback()
def root(
    ctx: typer.Context,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            "-n",
            metavar="NAME|URL",
            envvar="SPK_VISOR_NODE",
            help="Node by name (from the config file) or URL; default: the local daemon.",
        ),
    ] = None,
    ssh: Annotated[
        str | None,
        typer.Option(
            "--ssh",
            metavar="[USER@]HOST[:PORT]",
            envvar="SPK_VISOR_SSH",
            help="Reach the node over SSH (honours ~/.ssh/config); the daemon may bind "
            "127.0.0.1 only.",
        ),
    ] = None,
    fleet: Annotated[
        str | None,
        typer.Option(
            "--fleet",
            "-f",
            metavar="GROUP",
            envvar="SPK_VISOR_FLEET",
            help="Every node of a group from the config file, queried in parallel.",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            metavar="TOKEN",
            envvar="SPK_VISOR_TOKEN",
            show_envvar=True,
            help="API token (default: the node's token file; over SSH, read from the node).",
        ),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            envvar="SPK_VISOR_TIMEOUT",
            help="Network timeout per request [default: 10].",
        ),
    ] = None,
    accept_new: Annotated[
        bool,
        typer.Option(
            "--accept-new",
            help="Trust and record an SSH host key seen for the first time "
            "(a changed key is always refused).",
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug detail.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Options that apply to every command."""
    global _verbose  # noqa: PLW0603 (main() needs it to decide on tracebacks)
    _verbose = verbose

    def from_env(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name == "ENVIRONMENT"

    # Let config read the environment itself: a refused token is then reported as coming
    # from SPK_VISOR_TOKEN rather than from a --token that was never given, and a --fleet
    # on the command line wins over an exported SPK_VISOR_NODE (flag > env).
    if from_env("token"):
        token = None
    if from_env("node"):
        node = None
    if from_env("ssh"):
        ssh = None
    if from_env("fleet"):
        fleet = None
    if from_env("timeout"):
        timeout = None
    ctx.obj = AppState(
        Options(
            node=node,
            ssh=ssh,
            fleet=fleet,
            token=token,
            json=json,
            timeout=timeout,
            accept_new=accept_new,
            verbose=verbose,
        ),
        Console(),
    )


app.add_typer(node.app, name="node")
app.add_typer(vm.app, name="vm")
app.add_typer(iommu.app, name="iommu")
app.add_typer(vfio.app, name="vfio")
app.add_typer(pci.app, name="pci")
app.add_typer(reboot_uefi.app, name="reboot-uefi")
app.add_typer(ota.app, name="ota")
ota.register_aliases(app)
app.add_typer(deploy.app, name="deploy")
deploy.register_aliases(app)
app.add_typer(image.app, name="image")
about.register(app)
sealed.register(app)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; every failure becomes a message on stderr and its exit code."""
    global _verbose  # noqa: PLW0603 (reset: main() may run more than once in a process)
    _verbose = False
    console = Console()
    try:
        command = typer.main.get_command(app)
        # Without this, Typer imports pydantic on every run (~0.2 s): see typer_fast.
        typer_fast.install(command)
        result = command.main(
            args=list(argv) if argv is not None else None,
            prog_name="spk-visor",
            standalone_mode=False,
        )
        return int(result or 0)
    except typer.Exit as e:
        return int(e.exit_code)
    except typer.Abort:
        console.error("spk-visor: aborted")
        return ExitCode.INTERRUPTED
    except typer.TyperException as e:
        # Typer's usage errors (unknown option, missing argument) print their own text.
        show = getattr(e, "show", None)
        if show is not None:
            show(file=sys.stderr)
        else:
            console.error(f"spk-visor: error: {e.format_message()}")
        return ExitCode.USAGE
    except SpkVisorError as e:
        _traceback(console, e)
        console.error(redact(f"spk-visor: error: {e.diagnostics()}"))
        return int(e.exit_code)
    except KeyboardInterrupt:
        console.error("spk-visor: interrupted")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return _output_closed()
    except SystemExit as e:
        # Typer answers a write to a closed pipe with sys.exit(1), i.e. "internal error".
        if isinstance(e.__context__, BrokenPipeError):
            return _output_closed()
        raise
    except Exception as e:  # a bug: one line, the traceback only under --verbose
        _traceback(console, e)
        console.error(
            redact(f"spk-visor: internal error: {type(e).__name__}: {e}")
            + ("" if _verbose else "\nre-run with --verbose for the traceback")
        )
        return ExitCode.INTERNAL


def _traceback(console: Console, e: BaseException) -> None:
    if _verbose:
        # Redacted: exceptions further down the chain may quote a request's headers.
        console.error(redact("".join(traceback.format_exception(e))).rstrip("\n"))


def _output_closed() -> int:
    """`spk-visor vm list | head`: the reader has what it wanted. Point stdout at
    /dev/null so the interpreter's last flush does not fail again on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (tests)
        pass
    return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
