"""Settings precedence: flag, then environment, then default; bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from smechvisord import settings


def test_defaults_match_the_design() -> None:
    s = settings.load([], environ={})
    assert (s.bind_host, s.bind_port) == ("0.0.0.0", 8080)
    assert s.state_dir == Path("/var/lib/smechvisord")
    assert s.run_dir == Path("/run/smechvisord")
    assert s.token_file == Path("/etc/smechvisord/token")
    assert s.sysroot == Path("/")
    assert s.ch_bin == "cloud-hypervisor"
    assert s.firmware == Path("/usr/share/cloud-hypervisor/CLOUDHV.fd")
    assert s.image_dirs == (Path("/var/lib/smechvisord/vms"),)
    assert s.modprobe == ("modprobe",)
    assert s.reboot_cmd == ("reboot",)
    assert s.web_dir == Path("/usr/share/smechvisord/web")


def test_every_setting_has_a_flag_and_env() -> None:
    envs = {x.env for x in settings.SETTINGS}
    assert {
        "SMECHVISORD_BIND",
        "SMECHVISORD_WEB_DIR",
        "SMECHVISORD_STATE_DIR",
        "SMECHVISORD_RUN_DIR",
        "SMECHVISORD_TOKEN_FILE",
        "SMECHVISORD_SYSROOT",
        "SMECHVISORD_CH_BIN",
        "SMECHVISORD_FIRMWARE",
        "SMECHVISORD_IMAGE_DIRS",
        "SMECHVISORD_MODPROBE",
        "SMECHVISORD_REBOOT_CMD",
    } <= envs
    help_text = settings.build_parser().format_help()
    for x in settings.SETTINGS:
        assert x.flag in help_text and x.env in help_text


def test_flag_beats_env_beats_default() -> None:
    env = {
        "SMECHVISORD_BIND": "127.0.0.1:9000",
        "SMECHVISORD_STATE_DIR": "/srv/state",
        "SMECHVISORD_IMAGE_DIRS": "/a:/b",
        "SMECHVISORD_REBOOT_CMD": "systemctl reboot",
    }
    s = settings.load(["--bind", "127.0.0.2:0"], environ=env)
    assert (s.bind_host, s.bind_port) == ("127.0.0.2", 0)
    assert s.state_dir == Path("/srv/state")
    assert s.image_dirs == (Path("/a"), Path("/b"))
    assert s.reboot_cmd == ("systemctl", "reboot")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SMECHVISORD_BIND": "8080"}, "HOST:PORT"),
        ({"SMECHVISORD_BIND": "localhost:http"}, "not a number"),
        ({"SMECHVISORD_BIND": "localhost:70000"}, "out of range"),
        ({"SMECHVISORD_MODPROBE": "  "}, "empty command"),
        ({"SMECHVISORD_MAX_CONNECTIONS": "0"}, "out of range"),
        ({"SMECHVISORD_SOCKET_TIMEOUT": "soon"}, "not a number"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(settings.SettingsError, match=message) as info:
        settings.load([], environ=env)
    assert next(iter(env)) in str(info.value)


def test_ipv6_bind() -> None:
    s = settings.load(["--bind", "[::1]:8080"], environ={})
    assert (s.bind_host, s.bind_port) == ("::1", 8080)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bind", "1.2.3"], "--bind: expected HOST:PORT, got '1.2.3'"),
        (["--max-connections", "lots"], "--max-connections: 'lots' is not a number"),
        (["--socket-timeout", "0"], "--socket-timeout: 0.0 is out of range 0.1..3600.0"),
        (["--token-group", "Wheel!"], "--token-group: 'Wheel!' is not a group name"),
        (["--reboot-cmd", " "], "--reboot-cmd: empty command"),
    ],
)
def test_a_bad_flag_is_named_as_the_flag(argv: list[str], message: str) -> None:
    # The operator typed --bind; the error said SMECHVISORD_BIND, a variable they never set.
    with pytest.raises(settings.SettingsError) as caught:
        settings.load(argv, {})
    assert str(caught.value).startswith(message)
