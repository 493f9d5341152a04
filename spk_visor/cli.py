"""The root of `spk-visor`: global options, one sub-app per group, errors -> exit codes."""

# No `from __future__ import annotations` here: Typer would evaluate the root options'
# annotation strings (each an Annotated[..., typer.Option(...)]) several times per run,
# ~5 ms of start-up; as objects they are built once, at import.

import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer
from typer import _click
from typer.core import TyperGroup

from spk_visor import help_names, number_options, typer_fast
from spk_visor.commands.lazy import LazyGroup
from spk_visor.config import env_help
from spk_visor.errors import ExitCode, SpkVisorError, UsageError, redact, user_path_error
from spk_visor.output import Console

if TYPE_CHECKING:
    from spk_visor.commands.common import AppState

app = typer.Typer(
    name="spk-visor",
    # The command groups are imported only when one runs (start-up time: commands/lazy.py).
    cls=LazyGroup,
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
        from spk_visor.commands.about import print_version  # noqa: PLC0415

        print_version(_json)
        raise typer.Exit(0)


_verbose = False
# Whether a failure is reported as a JSON document on stdout too: --json seen on the
# command line, or asked for once parsed (global or the command's own --json: AppState).
# The document is one line, so that it also ends a JSON Lines stream (ota pull --json,
# vm console --follow --json) as one more record.
_json = False
# -q (ota apply/pull, the cron form) seen on the command line: a failure is one line
# (once the command is parsed, the -q it got counts instead: _one_line).
_quiet = False
_state: "AppState | None" = None


# No `envvar=` on these options: config.resolve reads every SPK_VISOR_* variable itself,
# so each one gets config.py's own message and precedence (flag > env > file).
@app.callback()
def root(
    ctx: typer.Context,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            "-n",
            metavar="NAME|URL",
            help="Node by name (from the config file) or URL; default: the local daemon.  "
            + env_help("node"),
        ),
    ] = None,
    ssh: Annotated[
        str | None,
        typer.Option(
            "--ssh",
            metavar="[USER@]HOST[:SSH_PORT]",
            help="Reach the node over SSH (honours ~/.ssh/config); the daemon may bind "
            "127.0.0.1 only. The :PORT is the SSH server's; the daemon's port on the node is "
            "--daemon-port.  " + env_help("ssh"),
        ),
    ] = None,
    daemon_port: Annotated[
        int | None,
        typer.Option(
            "--daemon-port",
            metavar="PORT",
            min=1,
            max=65535,
            help="With --ssh: the daemon's port on the node's loopback [default: 8080]. "
            "Configured nodes set daemon_port in the config file.  " + env_help("daemon_port"),
        ),
    ] = None,
    fleet: Annotated[
        str | None,
        typer.Option(
            "--fleet",
            "-f",
            metavar="GROUP",
            help="Every node of a group from the config file, queried in parallel.  "
            + env_help("fleet"),
        ),
    ] = None,
    inventory: Annotated[
        str | None,
        typer.Option(
            "--inventory",
            "-i",
            metavar="FILE",
            help="An Ansible inventory (INI or YAML) as the source of --fleet groups and "
            "--node names; its hosts are reached over SSH (ansible_host, ansible_port, "
            "ansible_user).  " + env_help("inventory"),
        ),
    ] = None,
    parallel: Annotated[
        int | None,
        typer.Option(
            "--parallel",
            "-P",
            metavar="N",
            help="With --fleet: nodes queried at once [default: 64]; a node silent for four "
            "times the others' usual answer (at most half a second) stops counting, so hung "
            "nodes cost their own timeout once.  " + env_help("parallel"),
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            metavar="TOKEN",
            help="API token (default: the node's token file; over SSH, read from the node).  "
            + env_help("token"),
        ),
    ] = None,
    json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Machine-readable output; an error is a JSON document too "
            '({"error": {...}}, and one per node with --fleet).',
        ),
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            help="Network timeout per request [default: 10].  " + env_help("timeout"),
        ),
    ] = None,
    accept_new: Annotated[
        bool,
        typer.Option(
            "--accept-new",
            help="Trust and record an SSH host key or a node's TLS certificate seen for the "
            "first time (a changed one is always refused).",
        ),
    ] = False,
    ca_file: Annotated[
        str | None,
        typer.Option(
            "--ca-file",
            metavar="PEM",
            help="Verify https nodes against this CA (and their host names) instead of "
            "pinning each node's certificate.  " + env_help("ca_file"),
        ),
    ] = None,
    insecure_http: Annotated[
        bool,
        typer.Option(
            "--insecure-http",
            help="Allow an http:// URL to a remote node: the token crosses the network "
            "in the clear.",
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
    global _verbose, _state  # noqa: PLW0603 (main() needs them when the command fails)
    _verbose = verbose
    # Imported here, not at the top: `spk-visor --version` and `help` need none of it.
    from spk_visor.commands.common import AppState, Options  # noqa: PLC0415

    ctx.obj = _state = AppState(
        Options(
            node=node,
            ssh=ssh,
            daemon_port=daemon_port,
            fleet=fleet,
            token=token,
            json=json,
            timeout=timeout,
            accept_new=accept_new,
            verbose=verbose,
            ca_file=ca_file,
            insecure_http=insecure_http,
            inventory=inventory,
            parallel=parallel,
        ),
        Console(),
    )


def build(complete: bool = False) -> _click.Command:
    """The root click command; `complete` loads every lazy command group too (for the man
    page generator and the tests that walk every command)."""
    command = typer.main.get_command(app)
    # Without this, Typer imports pydantic on every run (~0.2 s): see typer_fast.
    typer_fast.install(command)
    number_options.install(command)
    help_names.install(command)
    _carry_interrupts(command)
    if complete and isinstance(command, LazyGroup):
        command.load_all(command.context_class(command, info_name="spk-visor"))
    return command


class _Interrupted(Exception):
    """Ctrl-C, carried past Typer, which turns KeyboardInterrupt into a bare exit 130:
    main() must report it like any failure (under --json: the error document)."""


class _Signalled(KeyboardInterrupt):
    """SIGTERM (`timeout`, a service stop) or SIGHUP (the terminal closed): stopped
    through the same cleanup as Ctrl-C, exit 128 + the signal's number, as a shell says."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: object) -> None:
    raise _Signalled(signum)


def _stop_on_signals() -> dict[int, object]:
    """Install the SIGTERM and SIGHUP handlers; the ones they replace, for main() to put
    back. A signal inherited as ignored stays ignored: `nohup spk-visor ...` is meant to
    outlive its terminal (as SIGINT stays ignored in a script's background job)."""
    before: dict[int, object] = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue
            before[signum] = signal.signal(signum, _raise_signalled)
        except ValueError:  # not the main thread (main() called from a test's thread)
            break
    return before


def _carry_interrupts(command: _click.Command) -> None:
    invoke = command.invoke

    def invoke_carrying_interrupts(ctx: _click.Context) -> object:
        try:
            return invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted from e

    command.invoke = invoke_carrying_interrupts  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; every failure becomes a message on stderr and its exit code."""
    global _verbose, _json, _quiet, _state  # noqa: PLW0603 (reset: main() may run more than once)
    _verbose, _state = False, None
    args = list(argv) if argv is not None else sys.argv[1:]
    # Until the options are parsed (a usage error may come first), --json anywhere before
    # a lone "--" counts; so does -q, the cron form, which promises one line per failure.
    options = args[: args.index("--")] if "--" in args else args
    _json = "--json" in options
    _quiet = False
    console = Console()
    replaced = _stop_on_signals()
    try:
        command = build()
        # With --json too: the JSON goes to stdout, and cron mails stderr all the same.
        _quiet = _asks_quiet(options, command)
        _refuse_repeated_targets(options, command)
        result = command.main(
            args=args,
            prog_name="spk-visor",
            standalone_mode=False,
        )
        return int(result or 0)
    except typer.Exit as e:
        return int(e.exit_code)
    except typer.Abort:
        return _fail(console, "aborted", ExitCode.INTERRUPTED, say="spk-visor: aborted")
    except typer.TyperException as e:
        # Typer's usage errors (unknown option, missing argument) print their own text.
        show = getattr(e, "show", None)
        if _quiet:
            # Cron mails stderr: the error alone, on one line, without the usage block.
            return _fail(console, e.format_message(), ExitCode.USAGE)
        if show is not None:
            show(file=sys.stderr)
            return _fail(console, e.format_message(), ExitCode.USAGE, say=None)
        return _fail(console, e.format_message(), ExitCode.USAGE)
    except SpkVisorError as e:
        _traceback(console, e)
        console.error(redact(f"spk-visor: error: {_diagnostics(e)}"))
        if _json_errors():
            console.json_line(e.document())
        return int(e.exit_code)
    except (KeyboardInterrupt, _Interrupted) as e:
        stop = e if isinstance(e, _Signalled) else e.__cause__
        if isinstance(stop, _Signalled):
            name = signal.Signals(stop.signum).name
            return _fail(
                console,
                f"stopped by {name}",
                ExitCode.INTERRUPTED,
                say=f"spk-visor: {name}",
                status=128 + stop.signum,
            )
        return _fail(console, "interrupted", ExitCode.INTERRUPTED, say="spk-visor: interrupted")
    except BrokenPipeError:
        return _output_closed()
    except SystemExit as e:
        # Typer answers a write to a closed pipe with sys.exit(1), i.e. "internal error".
        if isinstance(e.__context__, BrokenPipeError):
            return _output_closed()
        raise
    except OSError as e:
        # A file or folder named on the command line is missing, a folder, unreadable...:
        # the user's to fix (exit 2). Any other path is ours: an internal error.
        mapped = user_path_error(e, args)
        if mapped is None:
            return _internal(console, e)
        _traceback(console, e)
        console.error(redact(f"spk-visor: error: {_diagnostics(mapped)}"))
        if _json_errors():
            console.json_line(mapped.document())
        return int(mapped.exit_code)
    except Exception as e:  # a bug: one line, the traceback only under --verbose
        return _internal(console, e)
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def _internal(console: Console, e: Exception) -> int:
    _traceback(console, e)
    return _fail(
        console,
        f"internal error: {type(e).__name__}: {e}",
        ExitCode.INTERNAL,
        hint=None if _verbose else "re-run with --verbose for the traceback",
        say="spk-visor: {}",
    )


def _fail(
    console: Console,
    message: str,
    code: ExitCode,
    hint: str | None = None,
    say: str | None = "spk-visor: error: {}",
    status: int | None = None,
) -> int:
    """Report a failure that is not an SpkVisorError: `say` on stderr, formatted with the
    message and hint (None: it is printed already), and under --json the same document an
    SpkVisorError gives. `status` is the exit status when it is not `code` itself (128 +
    the signal that stopped us); the document says the same status."""
    error = UsageError(message, hint)
    error.exit_code = code
    if say is not None:
        # After a SIGHUP the terminal is gone and the write fails (EIO): the exit status
        # must still say what happened.
        with contextlib.suppress(OSError):
            console.error(redact(say.format(_diagnostics(error))))
    if _json_errors():
        document = error.document()
        if status is not None:
            document["error"]["exit_code"] = status
        try:
            console.json_line(document)
        except (BrokenPipeError, ValueError, OSError):  # stdout is gone: stderr said it
            pass
    return int(code) if status is None else status


_QUIET = re.compile(r"--quiet|-q[A-Za-z]*")


def _asks_quiet(options: Sequence[str], command: _click.Command) -> bool:
    """-q or --quiet on the command line, alone or leading short flags (-qb FILE), and
    not the value of an option (--token -q, ota pull --channel -q): what a usage error
    goes by, raised before the command has its parsed -q. The words are followed down the
    command path, so each option's value is skipped by the options of the command it
    follows."""
    if not any(_QUIET.fullmatch(word) for word in options):
        return False  # the usual case: no command module is loaded for this
    ctx = command.context_class(command, info_name="spk-visor")
    takes_value = _takes_value(command)
    value_next = False
    for word in options:
        if value_next:
            value_next = False
        elif _QUIET.fullmatch(word):
            return True
        elif word in takes_value:
            value_next = True
        elif not word.startswith("-") and isinstance(command, TyperGroup):
            sub = command.get_command(ctx, word)
            if sub is not None:  # else an argument of the command, or a mistake
                command = sub
                ctx = command.context_class(command, parent=ctx, info_name=word)
                takes_value = _takes_value(command)
    return False


# The root's options that name where a command goes: a second one used to replace the
# first without a word (`--ssh n1 --ssh n2 ota push` went to n2 alone).
_TARGET_OPTIONS = ("node", "ssh", "fleet")
_HELP = ("--help", "-h")


def _refuse_repeated_targets(options: Sequence[str], command: _click.Command) -> None:
    """UsageError if --node, --ssh or --fleet is given twice before the command. Only
    the root's words are looked at (up to the first command name), and an option's value
    is skipped (`--token --ssh` is a token)."""
    names = {
        opt: p.opts[0]
        for p in command.params
        if p.name in _TARGET_OPTIONS
        for opt in p.opts + p.secondary_opts
    }

    def option_of(word: str) -> str:
        """The option a word gives: --ssh=a is --ssh, and -nb is -n with its value b."""
        if word.startswith("--"):
            return word.split("=", 1)[0]
        if word.startswith("-") and word[:2] in names:
            return word[:2]
        return word

    if sum(option_of(word) in names for word in options) < 2:
        return  # the usual case
    takes_value = _takes_value(command)
    seen: set[str] = set()
    repeated: str | None = None
    value_next = False
    for word in options:
        if value_next:
            value_next = False
            continue
        if word in _HELP:
            return  # the help asked for, as without the repeat
        name = option_of(word)
        if name in names:
            if names[name] in seen:
                repeated = repeated or names[name]
            seen.add(names[name])
        if word in takes_value:
            value_next = True
        elif not word.startswith("-"):
            break  # the command: its own options follow
    if repeated is not None:
        raise UsageError(
            f"{repeated} is given twice: a run goes to one node or one group",
            "for several nodes, make them a group in config.toml ([groups]) or an "
            "inventory and use --fleet GROUP",
        )


def _takes_value(command: _click.Command) -> set[str]:
    """The names of a command's options that take a value (--token, -n...)."""
    return {
        name
        for p in command.params
        if p.param_type_name == "option"
        and not getattr(p, "is_flag", True)
        and not getattr(p, "count", False)
        for name in p.opts + p.secondary_opts
    }


def _one_line() -> bool:
    """Whether a failure is said on one line: once the command is parsed, whether it got
    -q (ota apply/pull/push, the cron form); before, -q seen on the command line."""
    return _state.quiet if _state is not None else _quiet


def _diagnostics(e: SpkVisorError) -> str:
    """The message and its hint: on two lines, or joined into one under -q."""
    if not _one_line():
        return e.diagnostics()
    from spk_visor.ota.report import one_line  # noqa: PLC0415 (only under -q)

    return one_line(e.message, e.hint)


def _json_errors() -> bool:
    return _json or (_state is not None and _state.json)


def _traceback(console: Console, e: BaseException) -> None:
    if _verbose:
        import traceback  # noqa: PLC0415 (only under --verbose: start-up time)

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
