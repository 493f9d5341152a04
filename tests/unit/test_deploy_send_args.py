"""`deploy send` checks what the operator typed before any file is read or any target
contacted: a wrong --target, --discovery-port or --epoch is a usage error (exit 2) that
names the option, never an internal error or a "transient" failure to connect (exit 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spk_visor.errors import ExitCode
from tests.support import cli

CODE = "42-K7QX9"
MISSING = "/nonexistent/spk.spkb"  # read only after the options were checked


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--target", "[::1"], "--target"),
        (["--target", "256.1.1.1:5"], "--target"),
        (["--target", ":5"], "--target"),
        (["--target", "10.0.0.5:0"], "--target"),
        (["--target", "10.0.0.5:70000"], "--target"),
        (["--target", "node1.example:47475"], "--target"),
        (["--discovery-port", "70000"], "--discovery-port"),
        (["--discovery-port", "0"], "--discovery-port"),
        (["--epoch", "-1"], "--epoch"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], named: str) -> None:
    res = cli.run("deploy", "send", CODE, "--bundle", MISSING, *args)
    assert res.code == ExitCode.USAGE, res
    assert "internal error" not in res.err
    assert named in res.err, res.err
    assert MISSING not in res.err, "the bundle was opened before the options were checked"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5", ("10.0.0.5", 47475)),
        ("10.0.0.5:9", ("10.0.0.5", 9)),
        ("[fe80::1]:9", ("fe80::1", 9)),
        ("fe80::1", ("fe80::1", 47475)),
    ],
)
def test_good_targets(text: str, expected: tuple[str, int]) -> None:
    from spk_visor.deploy.donor import parse_target  # noqa: PLC0415

    assert parse_target(text) == expected


@pytest.mark.parametrize("args", [["--port", "70000"], ["--discovery-port", "70000"]])
def test_receive_ports_out_of_range_are_usage_errors(args: list[str]) -> None:
    """As root, `deploy receive --port 70000` reached bind(): OverflowError, exit 1."""
    res = cli.run("deploy", "receive", *args)
    assert res.code == ExitCode.USAGE, res
    assert args[0] in res.err and "internal error" not in res.err, res.err


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.support.ota_pki import Pki, make_bundle, tiny_tree  # noqa: PLC0415

    tmp = tmp_path_factory.mktemp("bundle")
    return str(make_bundle(tmp, Pki(), tree=tiny_tree(tmp / "t", "0.2.0")).bundle)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["42-K7QX9", "43-K7QX9", "--target", "127.0.0.1:9"], "--target"),
        (["42-K7QX9", "--target", "127.0.0.1:9", "--target", "127.0.0.2:9"], "--target"),
        (["42-K7QX9", "42-k7qx9", "--target", "127.0.0.1:9", "--target", "127.0.0.2:9"], "twice"),
        (
            ["42-K7QX9", "43-K7QX9", "--target", "127.0.0.1:9", "--target", "127.0.0.1:9"],
            "--target",
        ),
    ],
)
def test_argument_mistakes_print_nothing_before_the_error(
    real_bundle: str, args: list[str], named: str
) -> None:
    """`deploy send A B --target X` printed "sending release ..." before its usage error:
    every argument is checked before anything is said, read from the node or sent."""
    res = cli.run("deploy", "send", *args, "--bundle", real_bundle)
    assert res.code == ExitCode.USAGE, res
    assert "sending" not in res.err and res.out == "", res
    assert len(res.err_lines) == 2 and named in res.err_lines[0], res.err


def test_a_file_that_is_not_a_bundle_is_a_usage_error(tmp_path: Path) -> None:
    """As for `ota check`: a named file that is not a bundle is the user's mistake."""
    for data in (b"", b"hello\n"):
        path = tmp_path / "notes.txt"
        path.write_bytes(data)
        res = cli.run("deploy", "send", CODE, "--target", "127.0.0.1:9", "--bundle", str(path))
        assert res.code == ExitCode.USAGE, res
        assert f"{path} is not an OTA bundle" in res.err and "ota build" in res.err, res.err


def test_shim_iso_checks_its_arguments_before_it_says_or_makes_anything(tmp_path: Path) -> None:
    """`deploy shim-iso --kernel /nonexistent -o nodir/x/out.iso` printed "kernel: ..."
    and made nodir/x before it said the kernel was missing (with nothing to do)."""
    from tests.support.ota_pki import Pki  # noqa: PLC0415

    root = tmp_path / "root.json"
    root.write_bytes(Pki().root_env().to_bytes())
    (tmp_path / "folder").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["--kernel", "/nonexistent/vmlinuz", "-o", str(tmp_path / "out.iso")], "--kernel"),
        (["--kernel", str(root), "-o", str(tmp_path / "nodir" / "x" / "out.iso")], "mkdir"),
        (["--kernel", str(root), "-o", str(tmp_path / "folder")], "file name"),
    ]
    for args, hint in cases:
        res = cli.run("deploy", "shim-iso", "--trust-root", str(root), *args)
        assert res.code == ExitCode.USAGE, res
        assert res.out == "" and len(res.err_lines) == 2 and hint in res.err_lines[1], res
        assert sorted(p.name for p in tmp_path.iterdir()) == before
