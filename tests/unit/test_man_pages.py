"""The committed man pages are what scripts/gen-man makes of the code now; groff formats
them without a warning; and they cover every command, option, setting and exit code.

Everything expected here is read from the code (the Typer app, SETTINGS, ExitCode), never
listed by hand, so a new command fails only the drift check until `make man` is run.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from typer import _click

from smechvisord.settings import SETTINGS
from spk_visor import cli
from spk_visor.errors import ExitCode
from spk_visor.ota.nodeconf import NodeConfig
from tests.support.prereq import need_command

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "scripts" / "gen-man"
MAN = ROOT / "man"
PAGES = ("spk-visor.1", "smechvisord.8")


def roff(text: str) -> str:
    """How the pages spell a name or option: every hyphen is \\-."""
    return text.replace("-", "\\-")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Fresh pages, made in an environment chosen to leak into them if anything could: a
    tiny terminal, another $HOME and config, and every CLI and daemon variable set."""
    out = tmp_path_factory.mktemp("man")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPK_VISOR_", "SMECHVISORD_"))}
    env.update(
        COLUMNS="20",
        LINES="5",
        TERM="dumb",
        HOME=str(out / "home"),
        XDG_CONFIG_HOME=str(out / "xdg"),
        SPK_VISOR_CONFIG=str(out / "nowhere.toml"),
        SPK_VISOR_NODE="http://elsewhere.example:1",
        SPK_VISOR_TIMEOUT="99",
        SMECHVISORD_BIND="192.0.2.1:1",
        SMECHVISORD_STATE_DIR=str(out / "state"),
    )
    proc = subprocess.run(
        [sys.executable, str(GEN), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=out,
        check=False,
    )
    assert proc.returncode == 0, f"scripts/gen-man failed:\n{proc.stderr}"
    return {name: (out / name).read_text(encoding="utf-8") for name in PAGES}


def section(page: str, name: str) -> str:
    """The text of one .SH section."""
    m = re.search(rf'^\.SH "?{re.escape(name)}"?\n(.*?)(?=^\.SH |\Z)', page, re.M | re.S)
    assert m, f"no {name} section"
    return m.group(1)


def commands() -> list[tuple[tuple[str, ...], _click.Command]]:
    """Every command of the app below the root, with its path: (("vm", "create"), cmd)."""
    found: list[tuple[tuple[str, ...], _click.Command]] = []

    def walk(path: tuple[str, ...], cmd: _click.Command) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            if not sub.hidden:
                found.append(((*path, name), sub))
                walk((*path, name), sub)

    walk((), cli.build(complete=True))
    return found


def options_of(cmd: _click.Command) -> list[str]:
    ctx = _click.Context(cmd, info_name=cmd.name, **cmd.context_settings)
    return [
        opt
        for p in cmd.get_params(ctx)
        if p.param_type_name == "option" and not getattr(p, "hidden", False)
        for opt in (*p.opts, *p.secondary_opts)
    ]


# ---- (a) drift ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAGES)
def test_committed_page_matches_the_code(generated: dict[str, str], name: str) -> None:
    path = MAN / name
    committed = path.read_text(encoding="utf-8") if path.exists() else ""
    if committed != generated[name]:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    generated[name].splitlines(keepends=True),
                    f"man/{name} (committed)",
                    f"man/{name} (from the code)",
                )
            )[:80]
        )
        pytest.fail(f"man/{name} is out of date: run `make man` and commit it.\n{diff}")


def test_generation_is_deterministic(generated: dict[str, str], tmp_path: Path) -> None:
    """A second run, in this process's environment, gives the same bytes."""
    subprocess.run([sys.executable, str(GEN), "--out", str(tmp_path)], check=True)
    for name in PAGES:
        assert (tmp_path / name).read_text(encoding="utf-8") == generated[name], name


# ---- (b) groff ---------------------------------------------------------------------------


def groff_warnings(*paths: Path) -> str:
    groff = need_command("groff", "groff-base")
    proc = subprocess.run(
        [groff, "-man", "-ww", "-z", *map(str, paths)], capture_output=True, text=True, check=False
    )
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0 else " (exit != 0)")


def test_groff_is_clean_for_the_committed_pages() -> None:
    assert groff_warnings(*(MAN / n for n in PAGES)) == ""


def test_groff_is_clean_for_freshly_generated_pages(
    generated: dict[str, str], tmp_path: Path
) -> None:
    for name, text in generated.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert groff_warnings(*(tmp_path / n for n in PAGES)) == ""


def load_generator() -> ModuleType:
    # The script has no .py suffix (it is a command), so name the loader explicitly.
    loader = importlib.machinery.SourceFileLoader("gen_man", str(GEN))
    spec = importlib.util.spec_from_loader("gen_man", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_man"] = module  # dataclasses look their module up while decorating
    loader.exec_module(module)
    return module


def test_escaping_keeps_hostile_help_text_literal(tmp_path: Path) -> None:
    """Help text that looks like roff stays text: a leading dot or quote, backslashes,
    font escapes, non-ASCII; options keep ASCII hyphens, English words keep hyphens."""
    gen: Any = load_generator()
    roff_ = gen.Roff(frozenset({"reboot-uefi"}))
    page = gen.Page(roff_)
    hostile = [
        ".SH NOT A SECTION",
        "'br not a request",
        r"C:\path \fBnot bold\fR \\ done",
        "na\u00efve \u2014 dash, \u201cquotes\u201d",
        "use --accept-new or `spk-visor reboot-uefi`, a read-only check of reboot-uefi",
    ]
    page.req("TH", '"T"', "1")
    page.section("DESCRIPTION")
    for line in hostile:
        page.req("PP")
        page.prose(line)
    text = page.render()
    assert "\n.SH NOT" not in text and "\n'br" not in text
    assert "\\-\\-accept\\-new" in text and "reboot\\-uefi" in text
    assert "read-only" in text  # an English compound keeps its hyphen
    src = tmp_path / "t.1"
    src.write_text(text, encoding="utf-8")
    assert groff_warnings(src) == ""
    groff = need_command("groff", "groff-base")
    shown = subprocess.run(
        [groff, "-man", "-Tutf8", "-P", "-cbou", str(src)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    ).stdout
    flat = " ".join(shown.split())
    for expected in (
        ".SH NOT A SECTION",
        "'br not a request",
        r"C:\path \fBnot bold\fR \\ done",
        "na\u00efve \u2014 dash",
        "--accept-new",
    ):
        assert expected in flat, (expected, flat)


# ---- (c) coverage ------------------------------------------------------------------------


def test_every_command_and_its_options_are_in_spk_visor_1(generated: dict[str, str]) -> None:
    page = generated["spk-visor.1"]
    cmds = commands()
    assert {p[0] for p, _ in cmds} >= {"node", "vm", "iommu", "vfio", "pci", "reboot-uefi"}
    for path, cmd in cmds:
        heading = f'.SS "{roff(" ".join(path))}"'
        assert heading in page, f"no section for `spk-visor {' '.join(path)}`"
        body = page.split(heading + "\n", 1)[1].split("\n.SS ", 1)[0].split("\n.SH ", 1)[0]
        for opt in options_of(cmd):
            if opt in ("-h", "--help"):
                continue  # every command has them; OPTIONS says so once
            assert f"\\fB{roff(opt)}\\fR" in body, f"spk-visor {' '.join(path)}: no {opt}"


def test_every_global_option_is_in_spk_visor_1(generated: dict[str, str]) -> None:
    options = section(generated["spk-visor.1"], "OPTIONS")
    root_options = options_of(cli.build(complete=True))
    assert {"--node", "--ssh", "--fleet", "--token", "--json", "--version"} <= set(root_options)
    for opt in root_options:
        assert f"\\fB{roff(opt)}\\fR" in options, opt


def test_every_cli_environment_variable_is_in_spk_visor_1(generated: dict[str, str]) -> None:
    environment = section(generated["spk-visor.1"], "ENVIRONMENT")
    source = "\n".join(p.read_text() for p in (ROOT / "spk_visor").rglob("*.py"))
    names = set(re.findall(r"\bSPK_VISOR_[A-Z_]+\b", source))
    assert {"SPK_VISOR_TOKEN", "SPK_VISOR_CONFIG"} <= names
    for name in sorted(names):
        assert f"\\fB{name}\\fR" in environment, name


def test_every_daemon_setting_is_in_smechvisord_8(generated: dict[str, str]) -> None:
    page = generated["smechvisord.8"]
    options, environment = section(page, "OPTIONS"), section(page, "ENVIRONMENT")
    for s in SETTINGS:
        assert f"\\fB{s.env}\\fR" in environment, s.env
        assert f"\\fB{roff(s.flag)}\\fR" in options, s.flag


def test_both_pages_have_every_section(generated: dict[str, str]) -> None:
    common = [
        *("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "ENVIRONMENT", "FILES"),
        *("EXIT STATUS", "EXAMPLES", "SEE ALSO"),
    ]
    for name, page in generated.items():
        for title in common + (["COMMANDS"] if name == "spk-visor.1" else []):
            assert section(page, title).strip(), f"{name}: empty {title}"
    files = section(generated["spk-visor.1"], "FILES")
    for path in ("config.toml", "/etc/smechvisord/token", "known_hosts"):
        assert roff(path) in files, path
    files = section(generated["smechvisord.8"], "FILES")
    for path in ("/etc/conf.d/smechvisord", "/var/lib/smechvisord", "/run/smechvisord"):
        assert roff(path) in files, path


# ---- (d) exit codes ----------------------------------------------------------------------


def test_exit_status_lists_every_exit_code(generated: dict[str, str]) -> None:
    exit_status = section(generated["spk-visor.1"], "EXIT STATUS")
    listed = [int(v) for v in re.findall(r"^\\fB(\d+)\\fR$", exit_status, re.M)]
    assert listed == [int(c) for c in ExitCode]


def test_daemon_exit_status_lists_0_1_2(generated: dict[str, str]) -> None:
    exit_status = section(generated["smechvisord.8"], "EXIT STATUS")
    assert re.findall(r"^\\fB(\d+)\\fR$", exit_status, re.M) == ["0", "1", "2"]


# ---- (e) defaults ------------------------------------------------------------------------


def plain(roff_text: str) -> str:
    """Roff markup off: what a reader sees, on one line."""
    text = re.sub(r"\\f[BIRP]|\\%|\\&", "", roff_text).replace("\\-", "-").replace("\\e", "\\")
    return " ".join(text.split())


def option_items(page: str, path: tuple[str, ...]) -> dict[str, str]:
    """{option name: its paragraph} in the section of `spk-visor PATH`."""
    heading = f'.SS "{roff(" ".join(path))}"'
    body = page.split(heading + "\n", 1)[1].split("\n.SS ", 1)[0].split("\n.SH ", 1)[0]
    items: dict[str, str] = {}
    for tag, text in re.findall(r"^\.TP\n(.*)\n((?:(?!\.TP|\.SS|\.SH|\.PP).*\n?)*)", body, re.M):
        for opt in re.findall(r"\\fB(\\-[^\\]*(?:\\-[^\\]*)*)\\fR", tag):
            items[plain(opt)] = plain(text)
    return items


def stated_default(text: str) -> str | None:
    m = re.search(r"Default: (.+?)\.(?: Environment:| Optional\.|$)", text)
    return m.group(1) if m else None


def test_every_stated_default_is_the_real_one(generated: dict[str, str]) -> None:
    """The page's "Default:" of every option is what the code does when the option is not
    given: the parameter's own default, or for an option whose default is decided at run
    time (None) either nothing or the text the option gives for it (show_default)."""
    page = generated["spk-visor.1"]
    checked = 0
    for path, cmd in commands():
        items = option_items(page, path)
        ctx = _click.Context(cmd, info_name=cmd.name, **cmd.context_settings)
        for p in cmd.get_params(ctx):
            if p.param_type_name != "option" or getattr(p, "hidden", False) or p.name == "help":
                continue
            text = items.get(p.opts[0])
            assert text is not None, (path, p.opts)
            said = stated_default(text)
            value = p.get_default(ctx, call=False)
            where = f"spk-visor {' '.join(path)} {p.opts[0]}"
            if isinstance(getattr(p, "show_default", None), str):
                assert said == p.show_default, (where, said, p.show_default)  # type: ignore[attr-defined]
            elif value is None:
                assert said is None, f"{where}: decided at run time, but the page says {said}"
            elif getattr(p, "is_flag", False) and p.secondary_opts:
                side = p.opts[0] if value else p.secondary_opts[0]
                assert said == side, (where, said, side)
            checked += 1
    assert checked > 100


def test_ota_conf_defaults_are_ota_confs(generated: dict[str, str]) -> None:
    """`ota pull --apply-daemon`'s default is ota.conf's apply_daemon (true): the page said
    --no-apply-daemon. Every option that says an ota.conf key decides must name that key's
    real default."""
    page = generated["spk-visor.1"]
    defaults = NodeConfig()
    seen = set()
    for path in (("ota", "pull"), ("entire-system-upgrade",)):
        for opt, text in option_items(page, path).items():
            said = stated_default(text)
            if "[ota.conf]" in text or (said and "ota.conf" in said):
                assert said is not None, f"{' '.join(path)} {opt}: no default stated: {text}"
                m = re.fullmatch(r"ota\.conf's (\w+), else (\S+)", said)
                assert m, f"{' '.join(path)} {opt}: {said}"
                value = getattr(defaults, m.group(1))
                shown = str(value).lower() if isinstance(value, bool) else str(value)
                assert m.group(2) == shown, (opt, said, value)
                seen.add(m.group(1))
    assert {"apply_daemon", "stage_base", "channel"} <= seen


def test_smechvisord_exit_status_says_what_the_daemon_returns() -> None:
    # The page put "the listen address" under exit 1; the daemon exits 2 for it (and for
    # a token, state or image path it cannot use), as tests/integration/test_daemon_listen.py
    # and test_daemon_state_dir.py check.
    page = (ROOT / "man" / "smechvisord.8").read_text()
    section = page.split('.SH "EXIT STATUS"', 1)[1].split(".SH", 1)[0]
    items = dict(re.findall(r"\.TP\n\\fB(\d)\\fR\n(.*)", section))
    assert "listen address" in items["2"] and "listen address" not in items["1"], items
    assert "state directory" in items["2"], items
