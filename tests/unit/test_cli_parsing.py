"""The CLI in-process, with the network switched off: exit codes and the exact error
line for what people mistype, and the commands that need no node."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import NO_CONFIG, run

GROUPS = ["node", "vm", "iommu", "vfio", "pci", "reboot-uefi"]
VM_COMMANDS = [
    "list",
    "create",
    "show",
    "shutdown",
    "stop",
    "start",
    "reboot",
    "pause",
    "resume",
    "delete",
    "console",
]

CONFIG = """\
[defaults]
timeout = 5

[nodes.alpha]
url = "http://alpha.invalid:8080"

[nodes.beta]
url = "http://beta.invalid:8080"

[groups]
rack = ["alpha", "beta"]
"""


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing and configuration never touch the network (EXAMPLES.md G.28)."""

    def refuse(*_args: Any, **_kw: Any) -> None:
        raise AssertionError("a unit test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def config(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    return {"SPK_VISOR_CONFIG": str(path)}


# ---- usage errors: exit 2 and typer's own message --------------------------------------


def test_unknown_option() -> None:
    r = run("vm", "list", "--bogus")
    assert r.code == 2
    assert r.out == ""
    assert r.err_lines[-1] == "Error: No such option: --bogus"
    assert r.err_lines[0] == "Usage: spk-visor vm list [OPTIONS]"


def test_unknown_global_option() -> None:
    r = run("--bogus", "node")
    assert r.code == 2
    assert r.err_lines[-1].startswith("Error: No such option: --bogus")


def test_unknown_command() -> None:
    r = run("vm", "explode")
    assert r.code == 2
    assert r.err_lines[-1] == "Error: No such command 'explode'."


def test_group_without_command() -> None:
    r = run("vm")
    assert r.code == 2
    assert r.err_lines[-1] == "Error: Missing command."


def test_missing_vm_id() -> None:
    r = run("vm", "show")
    assert r.code == 2
    assert r.err_lines[-1] == "Error: Missing argument 'ID'."


@pytest.mark.parametrize("command", [c for c in VM_COMMANDS if c not in ("list", "create")])
@pytest.mark.parametrize("vm_id", ["", "  "])
def test_an_empty_vm_id_is_a_usage_error(command: str, vm_id: str) -> None:
    # It used to reach the daemon as GET /api/vms/ ("no API route /api/vms/").
    r = run("vm", command, vm_id, "--yes" if command == "delete" else "--json")
    assert r.code == 2, r
    assert r.err_lines[-1] == (
        "Error: Invalid value for 'ID': a VM id is required (`spk-visor vm list` shows them)"
    )


@pytest.mark.parametrize(
    ("memory", "why"),
    [
        ("4X", "'4X': expected MiB (512) or a size such as 512M or 4G"),
        ("lots", "'lots': expected MiB (512) or a size such as 512M or 4G"),
        ("1000K", "'1000K' is not a whole number of MiB"),
        ("0", "'0' is less than 1 MiB"),
        # Below the daemon's minimum: said here, in the option's words, not as the API's
        # "memory_mb: must be between 128 and ..." after a round trip.
        ("64", "'64' is 64 MiB; a VM needs at least 128 MiB"),
        ("0.1G", "'0.1G' is not a whole number of MiB"),
        ("100M", "'100M' is 100 MiB; a VM needs at least 128 MiB"),
    ],
)
def test_bad_memory(memory: str, why: str) -> None:
    r = run("vm", "create", "--cpus", "2", "--memory", memory, "--disk", "/vms/a.img")
    assert r.code == 2
    assert r.err_lines[-1] == f"Error: Invalid value for '--memory' / '-m': {why}"


def test_missing_disk() -> None:
    r = run("vm", "create", "--cpus", "2", "--memory", "4G")
    assert r.code == 2
    assert r.err_lines[-1] == "Error: Missing option '--disk' / '-d'."


def test_cpus_out_of_range() -> None:
    r = run("vm", "create", "--cpus", "0", "--memory", "4G", "--disk", "/vms/a.img")
    assert r.code == 2
    assert r.err_lines[-1] == (
        "Error: Invalid value for '--cpus' / '-c': Input should be greater than or equal to 1"
    )


def test_shutdown_timeout_out_of_range() -> None:
    r = run("vm", "shutdown", "web-1", "--timeout", "3601")
    assert r.code == 2
    assert r.err_lines[-1] == (
        "Error: Invalid value for '--timeout' / '-t': Input should be less than or equal to 3600"
    )


# ---- configuration errors: exit 2, one line that names the culprit --------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["vm", "show", "web-1"],
        ["vm", "create", "--cpus", "1", "--memory", "512", "--disk", "/vms/a.img"],
        ["vm", "shutdown", "web-1"],
        ["vm", "console", "web-1"],
        ["vfio", "enable"],
        ["vfio", "status"],
        ["reboot-uefi", "--yes"],
    ],
)
def test_fleet_on_single_node_command(config: dict[str, str], argv: list[str]) -> None:
    r = run("--fleet", "rack", *argv, env=config)
    assert r.code == 2
    assert r.err_lines == ["spk-visor: error: --fleet is not supported by this command; use --node"]


def test_unknown_node_name(config: dict[str, str]) -> None:
    r = run("--node", "gamma", "vm", "list", env=config)
    assert r.code == 2
    assert r.err_lines == [
        f"spk-visor: error: no node 'gamma' in {config['SPK_VISOR_CONFIG']} (nodes: alpha, beta)",
        "give a URL (http://HOST:8080) or add the node to the file",
    ]


def test_unknown_group(config: dict[str, str]) -> None:
    r = run("--fleet", "shelf", "node", env=config)
    assert r.code == 2
    assert r.err_lines == [
        f"spk-visor: error: no group 'shelf' in {config['SPK_VISOR_CONFIG']} (groups: rack)",
        "use one of them, or list the group's nodes under [groups] in that file "
        "(or give an Ansible inventory with -i)",
    ]


def test_node_and_fleet_together(config: dict[str, str]) -> None:
    r = run("--node", "alpha", "--fleet", "rack", "node", env=config)
    assert r.code == 2
    assert r.err_lines == ["spk-visor: error: give only one of --node, --ssh and --fleet"]


def test_bad_config_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[nodes.alpha]\nurl = "http://alpha:8080\n')
    r = run("vm", "list", env={"SPK_VISOR_CONFIG": str(path)})
    assert r.code == 2
    assert r.err_lines[0] == (
        f"spk-visor: error: {path}: invalid TOML: Illegal character '\\n' (at line 2, column 25)"
    )


def test_bad_config_shape_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[nodes.alpha]\nurl = "http://alpha:8080"\n\n[groups]\nrack = ["alpha", "zeta"]\n'
    )
    r = run("iommu", env={"SPK_VISOR_CONFIG": str(path)})
    assert r.code == 2
    assert r.err_lines == [
        f"spk-visor: error: {path}:5: groups.rack names 'zeta', which is not under [nodes]"
    ]


def test_bad_timeout_env_gets_the_configs_own_message() -> None:
    """config.py reads the environment, not Typer: its message names the variable and
    says what to do (Typer's "Input should be a valid number" never shows)."""
    r = run("pci", env={"SPK_VISOR_TIMEOUT": "soon"})
    assert r.code == 2
    assert r.err_lines == [
        "spk-visor: error: SPK_VISOR_TIMEOUT='soon' is not a number of seconds",
        "set it to a number such as 30, or unset it to use the default",
    ]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SPK_VISOR_TIMEOUT", "0", "spk-visor: error: SPK_VISOR_TIMEOUT 0: must be a positive"),
        ("SPK_VISOR_SSH", "a@b:c:d", "spk-visor: error: SPK_VISOR_SSH 'a@b:c:d': expected"),
        ("SPK_VISOR_DAEMON_PORT", "http", "spk-visor: error: SPK_VISOR_DAEMON_PORT='http' is"),
    ],
)
def test_every_variable_is_judged_by_config(variable: str, value: str, message: str) -> None:
    env = {variable: value}
    if variable == "SPK_VISOR_DAEMON_PORT":
        env["SPK_VISOR_SSH"] = "admin@node1"
    r = run("pci", env=env)
    assert r.code == 2, r
    assert r.err_lines[0].startswith(message), r.err
    assert "Invalid value" not in r.err


def test_a_bad_variable_does_not_stop_commands_that_need_no_node() -> None:
    r = run("version", env={"SPK_VISOR_TIMEOUT": "soon", "SPK_VISOR_DAEMON_PORT": "x"})
    assert (r.code, r.err) == (0, "")


# ---- commands that need no node --------------------------------------------------------


def test_version() -> None:
    r = run("version")
    assert (r.code, r.err) == (0, "")
    assert r.out.startswith("spk-visor ") and r.out.count("\n") == 1
    assert run("--version").out == r.out


def test_about() -> None:
    r = run("about")
    assert r.code == 0
    assert "sealed" in r.out and "spk-visor ota" in r.out


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "version"],
        ["version", "--json"],
        ["--json", "--version"],
        ["--json", "about"],
        ["about", "--json"],
    ],
)
def test_version_and_about_under_json_are_json(argv: list[str]) -> None:
    """`spk-visor --json version` printed "spk-visor 0.1.0": not a JSON document, which
    is what --json promises for every output."""
    r = run(*argv)
    assert (r.code, r.err) == (0, ""), r
    doc = json.loads(r.out)
    assert doc["version"] == run("version").out.split()[1]
    if "about" in argv:
        assert "sealed" in doc["about"]


def test_about_and_version_work_with_a_broken_config(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[[[")
    assert run("version", env={"SPK_VISOR_CONFIG": str(path)}).code == 0
    assert run("about", env={"SPK_VISOR_CONFIG": str(path)}).code == 0
    assert run("vm", "--help", env={"SPK_VISOR_CONFIG": str(path)}).code == 0


@pytest.mark.parametrize(
    "words",
    [[], ["ota"], ["ota", "pull"], ["vm", "create"], ["node"], ["entire-system-upgrade"]],
)
def test_help_shows_the_commands_own_help(words: list[str]) -> None:
    """`spk-visor help ota pull` is `spk-visor ota pull --help` (the product's docs
    promise `help`, `about` and `version`)."""
    r = run("help", *words)
    assert (r.code, r.err) == (0, "")
    assert r.out.rstrip("\n") == run(*words, "--help").out.rstrip("\n")
    usage = " ".join(["Usage: spk-visor", *words])
    assert r.out.startswith(usage + " "), r.out


def test_help_works_with_a_broken_config(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[[[")
    r = run("help", "vm", "list", env={"SPK_VISOR_CONFIG": str(path)})
    assert r.code == 0 and r.out.startswith("Usage: spk-visor vm list ")


def test_help_lists_help_about_and_version() -> None:
    listed = run("--help").out
    for command in ("help", "about", "version"):
        assert re.search(rf"^  {command}\s+\S", listed, re.M), command


@pytest.mark.parametrize(
    ("words", "lines"),
    [
        (
            ["vm", "nope"],
            [
                "spk-visor: error: `spk-visor vm` has no command 'nope'",
                "its commands: list, create, show, shutdown, stop, start, reboot, pause, "
                "resume, delete, console",
            ],
        ),
        (
            ["node", "list"],
            [
                "spk-visor: error: `spk-visor node` has no subcommands; 'list' is not one",
                "see: spk-visor help node",
            ],
        ),
    ],
)
def test_help_of_an_unknown_command_is_a_usage_error(words: list[str], lines: list[str]) -> None:
    r = run("help", *words)
    assert (r.code, r.out) == (2, "")
    assert r.err_lines == lines


def test_a_usage_error_under_json_is_a_json_document_too() -> None:
    r = run("--json", "vm", "list", "--bogus")
    assert r.code == 2
    assert json.loads(r.out) == {
        "error": {
            "message": "No such option: --bogus",
            "hint": None,
            "exit_code": 2,
            "reason": "usage",
        }
    }
    assert r.err_lines[-1] == "Error: No such option: --bogus"  # Typer's text, as before


def test_a_config_error_under_json_is_a_json_document_too() -> None:
    r = run("node", "--json", env={"SPK_VISOR_TIMEOUT": "soon"})
    assert r.code == 2
    error = json.loads(r.out)["error"]
    assert error["message"] == "SPK_VISOR_TIMEOUT='soon' is not a number of seconds"
    assert (error["exit_code"], error["reason"]) == (2, "usage")
    assert r.err_lines[0] == f"spk-visor: error: {error['message']}"


@pytest.mark.parametrize("command", ["system-install", "userland-install"])
def test_sealed_commands_refuse(command: str) -> None:
    r = run(command, "--anything", "goes")
    assert r.code == 3
    assert r.err_lines == [
        f"spk-visor: error: {command} is not available: SmechVisor is sealed",
        "the system changes only through signed updates: use `spk-visor ota`",
    ]


# ---- help ------------------------------------------------------------------------------


def test_root_help_lists_every_group() -> None:
    r = run("--help")
    assert r.code == 0
    for group in GROUPS:
        assert f"  {group} " in r.out


@pytest.mark.parametrize("group", GROUPS)
def test_group_help(group: str) -> None:
    r = run(group, "--help")
    assert r.code == 0, r
    assert r.out.startswith(f"Usage: spk-visor {group} ")
    assert r.err == ""


def test_vm_help_lists_every_command() -> None:
    out = run("vm", "--help").out
    for command in VM_COMMANDS:
        assert f"  {command} " in out


@pytest.mark.parametrize("command", VM_COMMANDS)
def test_vm_command_help(command: str) -> None:
    r = run("vm", command, "-h")
    assert r.code == 0, r
    assert r.out.startswith(f"Usage: spk-visor vm {command} ")


@pytest.mark.parametrize("command", ["enable", "disable", "status"])
def test_vfio_command_help(command: str) -> None:
    assert run("vfio", command, "--help").code == 0


def test_reboot_uefi_help_mentions_yes() -> None:
    out = run("reboot-uefi", "--help").out
    assert "--yes" in out and "--timeout" in out


def test_helper_isolates_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own SPK_VISOR_* settings do not leak into these tests."""
    monkeypatch.setenv("SPK_VISOR_FLEET", "mine")
    monkeypatch.setenv("SPK_VISOR_CONFIG", "/somewhere/else.toml")
    r = run("--fleet", "rack", "node")
    assert r.err_lines[0] == f"spk-visor: error: no group 'rack' in {NO_CONFIG} (groups: none)"
    assert r.err_lines[1].startswith("list the group's nodes under [groups]"), r.err


@pytest.mark.parametrize("command", ["node", "iommu", "pci", "reboot-uefi"])
def test_commands_without_subcommands_say_so(command: str) -> None:
    """`spk-visor pci --help` read "Usage: spk-visor pci [OPTIONS] COMMAND [ARGS]..." with no
    command to give, and `spk-visor pci groups` answered "No such command 'groups'"."""
    usage = run(command, "--help").out.splitlines()[0]
    assert usage.startswith(f"Usage: spk-visor {command} [OPTIONS]"), usage
    assert "COMMAND" not in usage, usage
    r = run(command, "extra")
    assert r.code == 2, r
    assert "unexpected extra argument" in r.err and "No such command" not in r.err, r.err


# ---- numbers: nan, inf, an empty value -------------------------------------------------


def _numeric_options() -> list[tuple[tuple[str, ...], str, str]]:
    """Every int or float option of every command: (command words, option, kind)."""
    from typer import _click  # noqa: PLC0415

    from spk_visor import cli  # noqa: PLC0415

    found: list[tuple[tuple[str, ...], str, str]] = []

    def walk(path: tuple[str, ...], cmd: _click.Command) -> None:
        ctx = _click.Context(cmd, info_name=cmd.name, **cmd.context_settings)
        for p in cmd.get_params(ctx):
            desc = getattr(p, "type_descriptor", None)
            if (
                p.param_type_name == "option"
                and desc is not None
                and desc.parameter_info.parser is None
            ) and desc.annotation in (int, float):
                found.append((path, p.opts[0], desc.annotation.__name__))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk((*path, name), sub)

    walk((), cli.build(complete=True))
    return found


NUMERIC = _numeric_options()


def test_the_numeric_options_are_all_found() -> None:
    named = {(path, opt) for path, opt, _kind in NUMERIC}
    assert {
        ((), "--timeout"),
        (("ota", "publish"), "--rollout"),
        (("ota", "pull"), "--jitter"),
    } <= named
    assert len(NUMERIC) >= 25


@pytest.mark.parametrize(
    ("path", "option", "kind"), NUMERIC, ids=lambda v: " ".join(v) if isinstance(v, tuple) else v
)
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "", " "])
def test_nan_inf_and_empty_numbers_say_what_to_give(
    path: tuple[str, ...], option: str, kind: str, value: str
) -> None:
    """`ota publish --rollout nan` said "Input should be less than or equal to 100", and
    `ota pull --jitter inf` was taken (a sleep without end). Every number option refuses
    a value that is not a finite number with one line naming it and saying what to give,
    before the command runs (exit 2)."""
    argv = [option, value, "pci"] if not path else [*path, option, value]
    r = run(*argv)
    assert r.code == 2, r
    last = r.err_lines[-1]
    assert last.startswith(f"Error: Invalid value for '{option}'"), r.err
    what = "empty value" if not value.strip() else f"{value!r} is not a"
    assert what in last and "; give a" in last, last
    assert "Input should" not in last, last
