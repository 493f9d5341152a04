"""`spk-visor vm`: list, create, show, lifecycle actions, delete and the serial console."""

from __future__ import annotations

import shlex
from collections.abc import Generator
from typing import Annotated, Any, cast

import typer

from smechvisord import protocol as p
from spk_visor import vmops
from spk_visor.client import Client, JsonDoc
from spk_visor.commands.common import AppState, JsonOpt, confirm, show_fleet_rows, state
from spk_visor.errors import ExitCode
from spk_visor.output import Column, mib, timestamp
from spk_visor.progress import waiting

app = typer.Typer(help="Virtual machines: list, create, start and stop, console.")


def _vm_id(value: str) -> str:
    # An empty id would reach the daemon as GET /api/vms/ and come back "no API route".
    if not value.strip():
        raise typer.BadParameter("a VM id is required (`spk-visor vm list` shows them)")
    return value


VmId = Annotated[str, typer.Argument(metavar="ID", callback=_vm_id, help="The VM's id (its name).")]

LIST_HEADERS = [
    Column("id"),
    Column("state"),
    Column("pid", absent="none"),
    Column("cpus", absent="?"),
    Column("memory", absent="?"),
    Column("cpu%", absent="n/a"),
    Column("disk", absent="none", fit="wrap"),
]
UNMANAGED = " (unmanaged)"

# The daemon's escalation steps, in words (design/daemon.md, graceful stop).
STEP_LABELS = {
    "vm.power-button": "ACPI power button",
    "vm.shutdown+vmm.shutdown": "vm.shutdown, then vmm.shutdown",
    "SIGTERM": "SIGTERM to the VMM",
    "SIGKILL": "SIGKILL to the VMM",
}


def _memory(text: str) -> int:
    # BadParameter, not ValueError: typer then names the option without a "Value error,"
    # prefix from its validation layer.
    try:
        mib = vmops.parse_memory(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if mib < p.MIN_MEMORY_MB:
        raise typer.BadParameter(
            f"{text!r} is {mib} MiB; a VM needs at least {p.MIN_MEMORY_MB} MiB"
        )
    return mib


# ---- rendering -----------------------------------------------------------------------


def list_row(vm: JsonDoc) -> list[Any]:
    cpu = vm.get("cpu_percent")
    return [
        str(vm.get("id")) + ("" if vm.get("managed", True) else UNMANAGED),
        vm.get("state"),
        vm.get("pid"),
        vm.get("cpus"),
        None if vm.get("memory_mb") is None else mib(vm.get("memory_mb")),
        None if cpu is None else f"{cpu:.1f}",
        vm.get("disk"),
    ]


def details(vm: JsonDoc) -> str:
    managed = vm.get("managed", True)
    cpu = vm.get("cpu_percent")
    rows: list[tuple[str, Any]] = [
        ("ID", vm.get("id")),
        ("Name", vm.get("name")),
        ("UUID", vm.get("uuid")),
        ("Managed", "yes" if managed else "no: a VMM that smechvisord did not start"),
        ("State", vm.get("state")),
        ("PID", vm.get("pid")),
        ("CPUs", vm.get("cpus")),
        ("Memory", mib(vm.get("memory_mb"))),
        ("Disk", vm.get("disk")),
        ("CPU", None if cpu is None else f"{cpu:.1f} %"),
        ("RSS", mib(vm.get("rss_mb"))),
    ]
    if managed:
        # An unmanaged VMM has no record: no times, no serial log the daemon knows of.
        rows += [
            ("Created", timestamp(vm.get("created_at"))),
            ("Started", timestamp(vm.get("started_at"))),
            ("Serial log", vm.get("serial_log")),
        ]
    rows.append(("API socket", vm.get("api_socket")))
    exit_info = vm.get("exit")
    if exit_info:
        rows.append(("Exit", exit_info.get("reason") or exit_info))
    shutdown = vm.get("last_shutdown")
    if shutdown:
        rows.append(("Last shutdown", shutdown_summary(shutdown)))
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k.ljust(width)}  {'-' if v is None else v}" for k, v in rows)
    if exit_info and exit_info.get("log_tail") and vm.get("state") == p.STATE_FAILED:
        text += "\nVMM log (last lines):\n" + "\n".join(
            f"  {line}" for line in exit_info["log_tail"]
        )
    return text


def shutdown_kind(shutdown: JsonDoc) -> str:
    """How it ended, in words. The daemon's `graceful` says a graceful shutdown was asked
    for; it was one only when the guest powered off at the ACPI button."""
    if not shutdown.get("graceful"):
        return "forced stop"
    steps = shutdown.get("steps") or []
    if steps and steps[-1].get("step") == "vm.power-button" and steps[-1].get("exited"):
        return "graceful shutdown"
    return "forced: the guest did not power off by itself"


def shutdown_summary(shutdown: JsonDoc) -> str:
    kind = shutdown_kind(shutdown).removesuffix(" shutdown").removesuffix(" stop")
    steps = shutdown.get("steps") or []
    last = steps[-1]["step"] if steps else "?"
    return f"{kind}, {shutdown.get('seconds', '?')} s, ended by {STEP_LABELS.get(last, last)}"


def steps_report(vm: JsonDoc) -> str:
    """The escalation steps the daemon took, one per line, and how the VMM ended."""
    shutdown = vm.get("last_shutdown") or {}
    kind = shutdown_kind(shutdown)
    lines = [f"VM {vm.get('id')}: {vm.get('state')} ({kind}, {shutdown.get('seconds', '?')} s)"]
    for number, step in enumerate(shutdown.get("steps") or [], 1):
        name = str(step.get("step"))
        outcome = "the VMM exited" if step.get("exited") else "still running"
        lines.append(f"  {number}. {STEP_LABELS.get(name, name)}: {step.get('result')}; {outcome}")
    exit_info = vm.get("exit") or {}
    if exit_info.get("reason"):
        lines.append(f"  exit: {exit_info['reason']}")
    return "\n".join(lines)


def state_line(vm: JsonDoc) -> str:
    pid = vm.get("pid")
    return f"VM {vm.get('id')}: {vm.get('state')}" + (f" (pid {pid})" if pid else "")


def created_line(doc: JsonDoc) -> str:
    cpus = doc.get("cpus")
    return (
        f"Created VM {doc.get('id')}: {doc.get('state')}, pid {doc.get('pid')}, "
        f"{cpus} vCPU{'' if cpus == 1 else 's'}, {mib(doc.get('memory_mb'))}, "
        f"disk {doc.get('disk')}"
    )


def dry_run_report(doc: JsonDoc) -> str:
    lines = [f"VM {doc.get('id')} would run:", "  " + shlex.join(doc.get("argv") or [])]
    problems = doc.get("problems") or []
    if problems:
        lines.append("It would be refused now:")
        lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


# ---- commands ------------------------------------------------------------------------


@app.command("list")
def list_vms(
    ctx: typer.Context,
    as_json: JsonOpt = False,
) -> None:
    """List the node's VMs (--fleet: every node's, one row per VM)."""
    st = state(ctx, as_json)
    if st.settings.fleet:
        code = show_fleet_rows(
            st,
            st.fleet(Client.vms),
            LIST_HEADERS,
            lambda vms: [list_row(vm) for vm in vms],
            empty="ok (no VMs)",
        )
        raise typer.Exit(code)
    vms = st.one(Client.vms)
    if st.json:
        st.console.json(vms)
    elif not vms:
        st.console.print("No VMs.")
    else:
        st.console.table(LIST_HEADERS, [list_row(vm) for vm in vms])


@app.command()
def create(
    ctx: typer.Context,
    *,
    cpus: Annotated[int, typer.Option("--cpus", "-c", metavar="N", min=1, help="Virtual CPUs.")],
    memory: Annotated[
        int,
        typer.Option(
            "--memory",
            "-m",
            metavar="SIZE",
            parser=_memory,
            help=f"Memory: MiB (512) or a size (512M, 4G); at least {p.MIN_MEMORY_MB} MiB.",
        ),
    ],
    disk: Annotated[
        str,
        typer.Option(
            "--disk",
            "-d",
            metavar="PATH",
            help="Disk image: an absolute path on the node, inside its image dirs.",
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="NAME",
            help="The VM's id: [a-z0-9][a-z0-9-]{0,31}; default: generated.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the cloud-hypervisor command line; start nothing."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a VM and boot it from its disk image."""
    st = state(ctx, as_json)
    spec = vmops.VmSpec(cpus=cpus, memory_mb=memory, disk=disk, name=name)
    base = st.settings.timeout
    if dry_run:
        doc = st.one(lambda c: vmops.create(c, spec, dry_run=True, base_timeout=base))
    else:
        with waiting(st.console, "Booting VM", vmops.action_budget("create")):
            doc = st.one(lambda c: vmops.create(c, spec, dry_run=False, base_timeout=base))
    if st.json:
        st.console.json(doc)
    elif dry_run:
        st.console.print(dry_run_report(doc))
    else:
        st.console.print(created_line(doc))
        st.console.print(f"Serial console: spk-visor vm console {doc.get('id')}")
    if dry_run and doc.get("problems"):
        raise typer.Exit(ExitCode.REFUSED)


@app.command()
def show(ctx: typer.Context, vm_id: VmId, as_json: JsonOpt = False) -> None:
    """Show one VM."""
    st = state(ctx, as_json)
    vm = st.one(lambda c: c.vm(vm_id))
    if st.json:
        st.console.json(vm)
    else:
        st.console.print(details(vm))


def _act(st: AppState, vm_id: str, action: str, timeout_seconds: int | None = None) -> JsonDoc:
    base = st.settings.timeout
    budget = vmops.action_budget(action, timeout_seconds)

    def work(c: Client) -> JsonDoc:
        return vmops.act(c, vm_id, action, base_timeout=base, timeout_seconds=timeout_seconds)

    if budget:
        verb = {"shutdown": "Shutting down", "stop": "Stopping", "start": "Starting"}[action]
        with waiting(st.console, f"{verb} {vm_id}", budget):
            return st.one(work)
    return st.one(work)


@app.command()
def shutdown(
    ctx: typer.Context,
    vm_id: VmId,
    *,
    timeout: Annotated[
        int,
        typer.Option(
            "--timeout",
            "-t",
            metavar="SECONDS",
            min=1,
            max=p.MAX_SHUTDOWN_TIMEOUT,
            help="How long the guest gets to power off after the ACPI power button, before "
            "smechvisord escalates (vm.shutdown, SIGTERM, SIGKILL: about 15 s more).",
        ),
    ] = p.DEFAULT_SHUTDOWN_TIMEOUT,
    as_json: JsonOpt = False,
) -> None:
    """Shut a VM down gracefully, escalating if the guest does not power off."""
    st = state(ctx, as_json)
    vm = _act(st, vm_id, "shutdown", timeout)
    if st.json:
        st.console.json(vm)
    else:
        st.console.print(steps_report(vm))


@app.command()
def stop(ctx: typer.Context, vm_id: VmId, as_json: JsonOpt = False) -> None:
    """Stop a VM now (no ACPI power button; the guest gets no chance to shut down)."""
    st = state(ctx, as_json)
    vm = _act(st, vm_id, "stop")
    if st.json:
        st.console.json(vm)
    else:
        st.console.print(steps_report(vm))


def _simple(action: str, doc: str) -> None:
    def command(ctx: typer.Context, vm_id: VmId, as_json: JsonOpt = False) -> None:
        st = state(ctx, as_json)
        vm = _act(st, vm_id, action)
        if st.json:
            st.console.json(vm)
        else:
            st.console.print(state_line(vm))

    command.__doc__ = doc
    app.command(action)(command)


_simple("start", "Start a stopped VM again from its record.")
_simple("reboot", "Reboot a VM (inside the same VMM process).")
_simple("pause", "Pause a running VM's vCPUs.")
_simple("resume", "Resume a paused VM.")


@app.command()
def delete(
    ctx: typer.Context,
    vm_id: VmId,
    *,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete a stopped VM's record and logs (its disk image is kept)."""
    st = state(ctx, as_json)

    def ask(vm: JsonDoc) -> bool:
        return confirm(
            st,
            f"Delete VM {vm.get('id')} ({vm.get('state')})? Its record and logs are removed; "
            f"the disk {vm.get('disk')} is kept.",
            yes=yes,
            action=f"delete VM {vm.get('id')}",
        )

    doc = st.one(lambda c: vmops.delete(c, vm_id, ask))
    if st.json:
        st.console.json(doc)
    else:
        st.console.print(f"Deleted VM {doc.get('deleted', vm_id)}.")


@app.command()
def console(
    ctx: typer.Context,
    vm_id: VmId,
    *,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Keep printing new output until the VM stops (exit 0) or Ctrl-C (130); "
            "a VM that is not running is refused (3).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the VM's serial log (the last 16 KiB; --follow: then what comes)."""
    st = state(ctx, as_json)

    def show_all(docs: Generator[JsonDoc, None, str | None]) -> str | None:
        """Print each document; what ended the follow (vmops.console's return)."""
        while True:
            try:
                doc = next(docs)
            except StopIteration as stop:
                return cast("str | None", stop.value)
            data = str(doc.get("data", ""))
            if st.json:
                # One document per chunk while following, so scripts can stream it.
                (st.console.json_line if follow else st.console.json)(doc)
            elif follow:
                st.console.write(data)
            else:
                # Keep the shell prompt off the guest's last, unfinished line.
                st.console.write(data if not data or data.endswith("\n") else data + "\n")

    try:
        ended = st.one(lambda c: show_all(vmops.console(c, vm_id, follow=follow)))
    except KeyboardInterrupt:
        if not follow:
            raise
        # Ctrl-C is how following ends: exit 130 with nothing after the guest's output.
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    if ended is not None:
        # The follow ran to its end (exit 0): say why on stderr, off the guest's output.
        st.console.error(f"VM {vm_id} {vmops.ended_words(ended)}: its console has ended.")
