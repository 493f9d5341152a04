"""`spk-visor deploy ...`: install a blank machine over the LAN (design/deploy.md).

    receive    on the target (the Deploy Shim runs it): show a code, wait for a donor
    send       on a donor: stream a signed release to the targets showing CODE...
    shim-iso   build the Deploy Shim ISO

The original tool's names stay as aliases: `receive-deploy` and `deploy-system-img-copy`.
The work is in spk_visor.deploy.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from spk_visor import output
from spk_visor.commands.common import JsonOpt, state
from spk_visor.errors import ExitCode, UsageError
from spk_visor.output import Column, Console, table

app = typer.Typer(
    help="Install blank machines over the LAN: a short code, a PAKE, a signed release.",
    no_args_is_help=True,
)

PortOpt = Annotated[
    int | None,
    typer.Option(
        "--port", metavar="N", min=0, max=65535, help="TCP port of the receiver [default: 47475]."
    ),
]


def _default_trust_root() -> Path:
    from spk_visor.ota.nodeconf import NodePaths  # noqa: PLC0415

    sysroot = os.environ.get("SPK_VISOR_OTA_SYSROOT", "/")
    return NodePaths(Path(sysroot)).factory_root


def _load_root(path: Path | None) -> Any:
    from spk_visor.ota import roots  # noqa: PLC0415 (cryptography only when needed)

    root, _raw = roots.load_file(
        path or _default_trust_root(),
        hint="the shim bakes it in at build time; elsewhere pass --trust-root FILE",
    )
    return root


class _Screen:
    """What the receiver shows: human lines on stderr, or JSON Lines on stdout."""

    def __init__(self, console: Console, as_json: bool) -> None:
        self.console = console
        self.as_json = as_json
        self.lock = threading.Lock()

    def __call__(self, event: str, doc: dict[str, Any]) -> None:
        with self.lock:
            if self.as_json:
                self.console.json_line({"event": event, "time": round(time.time(), 3), **doc})
                return
            line = self.render(event, doc)
            if line:
                self.console.error(line)

    @staticmethod
    def render(event: str, doc: dict[str, Any]) -> str | None:
        if event == "code":
            disks = ", ".join(_disk_label(d) for d in doc.get("disks", []))
            return (
                f"\n    deploy code:  {doc['code']}    (port {doc['port']}, epoch {doc['epoch']})\n"
                f"    eligible disks: {disks or 'none'}\n"
                f"    on the donor: spk-visor deploy send {doc['code']}\n"
            )
        if event in ("wrong_code", "code_locked", "limited"):
            return str(doc["message"])
        if event == "connected":
            return f"donor {doc['from']} connected; verifier {doc['verifier']}"
        if event == "failed":
            tail = " (resumable: reconnect with the same plan)" if doc.get("resumable") else ""
            return f"deploy failed: {doc['reason']}{tail}"
        if event == "plan_refused":
            from spk_visor.deploy.messages import refusal  # noqa: PLC0415 (crypto imports)

            return f"plan refused: {refusal(str(doc['reason']), str(doc.get('message', '')))}"
        if event in ("phase", "state"):
            return f"{event}: {doc.get(event)}"
        if event == "report":
            return f"deploy {'succeeded' if doc.get('ok') else 'FAILED'}"
        if event == "busy_refused":
            wait = doc.get("retry_after")
            if isinstance(wait, (int, float)):
                return (
                    f"refused a donor from {doc.get('from')}: in the wrong-code wait "
                    f"({wait:.1f} s left)"
                )
            return f"refused a donor from {doc.get('from')}: busy with another donor"
        if event == "stopped":
            return f"deploy receive stopped: {doc.get('reason')}"
        if event == "handshake_failed":
            return f"handshake with {doc.get('from')} failed: {doc.get('reason')}"
        if event == "error":
            return f"error: {doc.get('reason')}"
        if event == "reboot":
            return f"rebooting: {' '.join(str(a) for a in doc.get('argv') or [])}"
        if event == "code_rotated":
            return f"too many wrong codes: new code (epoch {doc.get('epoch')})"
        return None


def _interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM stop the receiver through its cleanup (a half-done install is
    aborted and unmounted). Installed explicitly: started as a script's background job,
    the process inherits SIGINT as ignored and Python then installs no handler of its own."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def _disk_label(disk: dict[str, Any]) -> str:
    """`SERIAL (512 MiB, MODEL)`; the model left out when the disk reports none."""
    parts = [output.size(disk["size"])] if isinstance(disk.get("size"), int) else []
    if disk.get("model"):
        parts.append(str(disk["model"]))
    return f"{disk['serial']} ({', '.join(parts)})" if parts else str(disk["serial"])


@app.command("receive")
def receive(
    ctx: typer.Context,
    port: PortOpt = None,
    allow_loop: Annotated[
        bool, typer.Option("--allow-loop", help="Treat loop devices as disks (tests only).")
    ] = False,
    disk_policy: Annotated[
        list[str],
        typer.Option(
            "--disk-policy",
            metavar="SERIAL",
            help="Unattended: a disk serial this machine may wipe without a typed "
            "confirmation (repeat for several).",
        ),
    ] = [],  # noqa: B006 (typer reads the default, never mutates it)
    reboot_cmd: Annotated[
        str,
        typer.Option(
            "--reboot-cmd",
            metavar="ARGV",
            help="Command run after a successful deploy when the donor asks for a reboot "
            "(split on blanks).",
        ),
    ] = "reboot",
    trust_root: Annotated[
        Path | None,
        typer.Option(
            "--trust-root",
            metavar="FILE",
            help="Root document the release must verify under [default: the factory root].",
        ),
    ] = None,
    mountpoint: Annotated[
        Path, typer.Option("--mountpoint", metavar="DIR", help="Where the target is mounted.")
    ] = Path("/mnt/target"),
    nameplate: Annotated[
        str | None, typer.Option("--nameplate", metavar="NN", help="Fixed nameplate.")
    ] = None,
    bind: Annotated[
        str, typer.Option("--bind", metavar="ADDR", help="Address to listen on.")
    ] = "0.0.0.0",  # noqa: S104 (the shim serves whatever LAN it booted on)
    discovery_port: Annotated[
        int | None,
        typer.Option(
            "--discovery-port", metavar="N", min=0, max=65535, help="UDP announcement port."
        ),
    ] = None,
    no_announce: Annotated[
        bool, typer.Option("--no-announce", help="Do not broadcast (use --target on the donor).")
    ] = False,
    once: Annotated[bool, typer.Option("--once", help="Exit after one successful deploy.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Target side: show a code and the eligible disks, install what a donor with the code
    sends (one donor at a time), reboot when it asks."""
    from spk_visor.deploy import channel, receiver  # noqa: PLC0415

    st = state(ctx, as_json)
    if os.geteuid() != 0:
        raise UsageError("deploy receive partitions disks and must run as root")
    argv = reboot_cmd.split()
    if not argv:
        raise UsageError("--reboot-cmd is empty")
    options = receiver.Options(
        trust_root=_load_root(trust_root),
        mountpoint=mountpoint,
        port=channel.PORT if port is None else port,
        bind=bind,
        discovery_port=channel.DISCOVERY_PORT if discovery_port is None else discovery_port,
        announce=not no_announce,
        nameplate=nameplate,
        allow_loop=allow_loop,
        disk_policy=frozenset(disk_policy),
        reboot_cmd=tuple(argv),
        once=once,
    )
    screen = _Screen(st.console, st.json)
    r = receiver.Receiver(options, screen)
    _interrupt_on_signals()
    try:
        r.serve()
    except KeyboardInterrupt:
        r.stop()
        # The "stopped" event is the report (under --json, the last document).
        screen("stopped", {"reason": "interrupted"})
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None


@app.command("send")
def send(
    ctx: typer.Context,
    codes: Annotated[
        list[str], typer.Argument(metavar="CODE...", help="The code on each target's screen.")
    ],
    bundle: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            metavar="FILE",
            help="The signed release (.spkb) to install [default: the release this node "
            "runs, from its OTA store].",
        ),
    ] = None,
    authorized_key: Annotated[
        list[Path],
        typer.Option(
            "--authorized-key",
            metavar="FILE",
            help="An OpenSSH public key file (e.g. ~/.ssh/id_ed25519.pub) whose keys may log "
            "in as root on the new node; repeatable.",
        ),
    ] = [],  # noqa: B006
    target: Annotated[
        list[str],
        typer.Option(
            "--target",
            metavar="IP[:PORT]",
            help="Skip discovery: the target's address (one per CODE, in order).",
        ),
    ] = [],  # noqa: B006 (typer reads the default, never mutates it)
    disk: Annotated[
        list[str],
        typer.Option(
            "--disk",
            metavar="SERIAL",
            help="Install to the disk with this serial (one per CODE, in order, for "
            "several targets) [default: the target's only eligible disk].",
        ),
    ] = [],  # noqa: B006
    confirm_wipe: Annotated[
        list[str],
        typer.Option(
            "--confirm-wipe",
            metavar="SERIAL",
            help="Allow wiping this disk although it holds a partition table or filesystem.",
        ),
    ] = [],  # noqa: B006
    hostname: Annotated[
        str, typer.Option("--hostname", metavar="NAME", help="Hostname of the installed node.")
    ] = "smechvisor",
    epoch: Annotated[
        int | None,
        typer.Option("--epoch", metavar="N", min=0, help="Code epoch (default: the target's)."),
    ] = None,
    no_reboot: Annotated[
        bool, typer.Option("--no-reboot", help="Leave the target running after success.")
    ] = False,
    discovery_timeout: Annotated[
        float,
        typer.Option(
            "--discovery-timeout",
            metavar="SECONDS",
            min=0.5,
            help="How long to listen for the targets' announcements.",
        ),
    ] = 30.0,
    discovery_port: Annotated[
        int | None,
        typer.Option(
            "--discovery-port", metavar="N", min=1, max=65535, help="UDP announcement port."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Donor side: stream a signed release to each target showing one of CODE...
    (in parallel), then print one line per target. Exit 0 only if all succeeded."""
    from spk_visor.deploy.hostname import problem as hostname_problem  # noqa: PLC0415

    st = state(ctx, as_json)
    from spk_visor.deploy import channel, donor  # noqa: PLC0415

    # Everything the operator typed is checked before anything is said, any file read or
    # anyone contacted.
    donor.check_arguments(codes, target)
    why = hostname_problem(hostname)
    if why is not None:
        raise UsageError(f"--hostname: {why}")
    keys = _authorized_keys(authorized_key)

    if bundle is None:
        # The release this node runs, as signed: its manifest and blobs from the OTA store.
        from spk_visor.ota.nodeconf import node_paths  # noqa: PLC0415

        payload = donor.open_node_release(node_paths())
    else:
        from spk_visor.ota import spool  # noqa: PLC0415

        # Read at offsets, once per target: a pipe is first copied into a private file.
        payload = donor.open_bundle(ctx.with_resource(spool.as_file(bundle)))
    if not st.json:
        st.console.error(
            f"sending release {payload.version} (counter {payload.counter}, manifest "
            f"{payload.manifest_sha256[:12]}…) from {payload.source}"
        )
    try:
        targets = donor.locate(
            codes,
            target,
            epoch=epoch,
            discovery_port=channel.DISCOVERY_PORT if discovery_port is None else discovery_port,
            discovery_timeout=discovery_timeout,
        )
    except donor.DeployFailed as e:
        results = [
            donor.Result(c.split("-")[0], False, int(e.exit_code), e.phase, e.message)
            for c in codes
        ]
    else:
        settings = donor.Settings(
            disks=tuple(disk),
            confirm_wipe=tuple(confirm_wipe),
            hostname=hostname,
            reboot=not no_reboot,
            authorized_keys=keys,
        )
        bars = not st.json and st.console.err_is_tty
        results = donor.send(
            payload, targets, settings, donor.tqdm_progress if bars else donor.no_progress
        )
    if st.json:
        st.console.json([r.to_doc() for r in results])
    else:
        st.console.print(
            table(
                [
                    "target",
                    "exit",
                    "phase",
                    Column("verifier", absent="none"),
                    "sent",
                    "time",
                    "message",
                ],
                [
                    [
                        r.target,
                        r.exit_code,
                        r.phase,
                        r.verifier or None,
                        r.sent,
                        f"{r.seconds:.1f} s",
                        r.message,
                    ]
                    for r in results
                ],
            )
        )
    # The donor's exit is part of every deploy's time: the interpreter's final garbage
    # collection would walk every object the imports made (15-20 ms here) only to free
    # memory that the exit frees anyway. Frozen at exit (atexit runs before that
    # collection; a process that calls this and goes on is not affected), they are
    # skipped; the flushing of stdout and stderr and every refcount-driven close still run.
    atexit.unregister(gc.freeze)  # once, however often a process sends
    atexit.register(gc.freeze)
    worst = donor.overall_exit(results)
    if worst != ExitCode.OK:
        raise typer.Exit(int(worst))


def _authorized_keys(files: list[Path]) -> str | None:
    """The --authorized-key files, read and checked before anyone is contacted."""
    if not files:
        return None
    from spk_visor.deploy import authkeys  # noqa: PLC0415

    texts = []
    for path in files:
        try:
            with path.open("rb") as f:
                raw = f.read(authkeys.MAX_BYTES + 1)
            text = raw.decode("utf-8")
            texts.append(authkeys.validate(text))
        except OSError as e:
            raise UsageError(f"--authorized-key {path}: {e.strerror or e}") from e
        except (UnicodeDecodeError, ValueError) as e:
            raise UsageError(
                f"--authorized-key {path}: {e}",
                "give an OpenSSH public key file, such as ~/.ssh/id_ed25519.pub",
            ) from e
    try:
        return authkeys.validate("".join(texts))
    except ValueError as e:
        raise UsageError(f"--authorized-key: {e}") from e


@app.command("shim-iso")
def shim_iso(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="The ISO to write.")],
    kernel: Annotated[
        Path | None,
        typer.Option("--kernel", metavar="PATH", help="Kernel image or linux-image .deb."),
    ] = None,
    trust_root: Annotated[
        Path | None,
        typer.Option(
            "--trust-root",
            metavar="FILE",
            help="Root document to bake in [default: this node's factory root].",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build the Deploy Shim ISO (BIOS + UEFI, hybrid for USB sticks)."""
    from spk_visor.deploy import shim_iso as shim  # noqa: PLC0415

    st = state(ctx, as_json)

    def progress(message: str) -> None:
        if not st.json:
            st.console.error(message)

    # No trust root given: build_iso takes this node's factory root, or says it has none.
    result = shim.build_iso(out, kernel=kernel, trust_root=trust_root, progress=progress)
    if st.json:
        st.console.json({k: _jsonable(v) for k, v in dataclasses.asdict(result).items()})
    else:
        st.console.print(
            f"wrote {result.path} ({_mb(result.size)}, kernel {result.kernel_version}, "
            f"initramfs {_mb(result.initrd_size)} {result.compression}, {result.seconds:.0f} s)"
        )
        for warning in result.warnings:
            st.console.error(f"warning: {warning}")


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def register_aliases(root: typer.Typer) -> None:
    """The original tool's names: `receive-deploy` and `deploy-system-img-copy`."""
    root.command("receive-deploy", help="Alias of `deploy receive`: wait for a donor and install.")(
        receive
    )
    root.command(
        "deploy-system-img-copy",
        help="Alias of `deploy send`: stream the release to the target showing CODE.",
    )(send)
