"""smechvisord.vfio and smechvisord.hostcmd with the recording stand-in for modprobe/reboot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from smechvisord.hostcmd import HostCommandError, run_host_command, run_reboot
from smechvisord.vfio import VfioError, set_vfio, vfio_command

RECORD_COMMAND = Path(__file__).resolve().parents[1] / "support" / "bin" / "record-command"


@pytest.fixture
def record_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "commands.jsonl"
    monkeypatch.setenv("RECORD_FILE", str(path))
    monkeypatch.delenv("RECORD_EXIT", raising=False)
    monkeypatch.delenv("RECORD_STDERR", raising=False)
    return path


def recorded(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [json.loads(line)["argv"] for line in path.read_text().splitlines()]


def test_enable_runs_modprobe_vfio_pci(record_file: Path) -> None:
    result = set_vfio(True, (str(RECORD_COMMAND),))
    assert recorded(record_file) == [[str(RECORD_COMMAND), "vfio-pci"]]
    assert result == {
        "enabled": True,
        "command": [str(RECORD_COMMAND), "vfio-pci"],
        "output": "",
    }


def test_disable_runs_modprobe_r(record_file: Path) -> None:
    result = set_vfio(False, (str(RECORD_COMMAND),))
    assert recorded(record_file) == [[str(RECORD_COMMAND), "-r", "vfio-pci"]]
    assert result["enabled"] is False
    assert result["command"] == [str(RECORD_COMMAND), "-r", "vfio-pci"]


def test_multi_word_modprobe_setting_is_kept_as_argv(record_file: Path) -> None:
    # SMECHVISORD_MODPROBE="record-command modprobe --verbose" becomes this tuple.
    modprobe = (str(RECORD_COMMAND), "modprobe", "--verbose")
    set_vfio(True, modprobe)
    assert recorded(record_file) == [[*modprobe, "vfio-pci"]]


def test_arguments_are_not_interpreted_by_a_shell(record_file: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    modprobe = (str(RECORD_COMMAND), f"; touch {canary}", "$(id)")
    set_vfio(True, modprobe)
    assert recorded(record_file) == [[*modprobe, "vfio-pci"]]
    assert not canary.exists()


def test_output_is_returned(record_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECORD_STDERR", "insmod /lib/modules/vfio-pci.ko")
    result = set_vfio(True, (str(RECORD_COMMAND),))
    assert result["output"] == "insmod /lib/modules/vfio-pci.ko"


def test_failure_carries_command_exit_code_and_stderr(
    record_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECORD_EXIT", "1")
    monkeypatch.setenv("RECORD_STDERR", "modprobe: FATAL: Module vfio_pci is in use.")
    with pytest.raises(VfioError) as info:
        set_vfio(False, (str(RECORD_COMMAND),))
    err = info.value
    assert err.command == [str(RECORD_COMMAND), "-r", "vfio-pci"]
    assert err.exit_code == 1
    assert err.stderr == "modprobe: FATAL: Module vfio_pci is in use."
    assert "exited with status 1" in str(err)
    assert "Module vfio_pci is in use" in str(err)
    assert isinstance(err, HostCommandError)
    # It ran once and was recorded: the failure is the command's, not the runner's.
    assert len(recorded(record_file)) == 1


def test_missing_modprobe_is_a_vfio_error(tmp_path: Path) -> None:
    with pytest.raises(VfioError) as info:
        set_vfio(True, (str(tmp_path / "no-such-modprobe"),))
    assert info.value.exit_code is None
    assert "cannot run" in str(info.value)


def test_timeout_kills_and_raises(tmp_path: Path) -> None:
    sleeper = (
        sys.executable,
        "-c",
        "import sys, time; print('loading', file=sys.stderr, flush=True); time.sleep(30)",
    )
    with pytest.raises(VfioError) as info:
        set_vfio(True, sleeper, timeout=0.5)
    assert info.value.exit_code is None
    assert "did not finish within 0.5 s" in str(info.value)


def test_stdin_is_not_inherited(record_file: Path) -> None:
    # A command that reads stdin gets EOF at once instead of waiting on the daemon's.
    reader = (sys.executable, "-c", "import sys; assert sys.stdin.read() == ''")
    run_host_command(reader, timeout=10)


def test_long_stderr_is_cut_to_its_tail(monkeypatch: pytest.MonkeyPatch, record_file: Path) -> None:
    monkeypatch.setenv("RECORD_EXIT", "3")
    monkeypatch.setenv("RECORD_STDERR", "x" * 10_000 + "THE END")
    with pytest.raises(HostCommandError) as info:
        run_host_command([str(RECORD_COMMAND)], timeout=10)
    assert info.value.stderr.endswith("THE END")
    assert len(info.value.stderr) <= 2003


def test_vfio_command_is_what_set_vfio_runs() -> None:
    assert vfio_command(True, ("modprobe",)) == ["modprobe", "vfio-pci"]
    assert vfio_command(False, ("modprobe",)) == ["modprobe", "-r", "vfio-pci"]


def test_run_reboot_records_and_fails(record_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_reboot((str(RECORD_COMMAND), "-f"))
    assert recorded(record_file) == [[str(RECORD_COMMAND), "-f"]]
    monkeypatch.setenv("RECORD_EXIT", "2")
    monkeypatch.setenv("RECORD_STDERR", "reboot: must be superuser")
    with pytest.raises(HostCommandError, match="must be superuser") as info:
        run_reboot((str(RECORD_COMMAND),))
    assert info.value.exit_code == 2


def test_record_command_fails_loudly_without_record_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RECORD_FILE", raising=False)
    with pytest.raises(HostCommandError) as info:
        run_host_command([str(RECORD_COMMAND)], timeout=10)
    assert info.value.exit_code == 97
    assert "RECORD_FILE is not set" in info.value.stderr
