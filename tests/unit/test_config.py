"""Settings precedence and config-file checks of the CLI (spk_visor.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spk_visor import config
from spk_visor.errors import ConfigError, ExitCode

GOOD = """
[defaults]
timeout = 4

[nodes.alpha]
url = "http://alpha.example:8080"
token_file = "{tokdir}/alpha.token"

[nodes.beta]
ssh = "admin@beta.example:2222"
daemon_port = 9090

[groups]
rack = ["alpha", "beta"]
"""


def env_for(tmp_path: Path, text: str | None, **extra: str) -> dict[str, str]:
    path = tmp_path / "config.toml"
    if text is not None:
        path.write_text(text.format(tokdir=tmp_path))
    return {"SPK_VISOR_CONFIG": str(path), **extra}


def resolve(env: dict[str, str], **kw: object) -> config.Settings:
    args: dict[str, object] = {
        "node": None,
        "ssh": None,
        "fleet": None,
        "token": None,
        "timeout": None,
        "accept_new": False,
    }
    args.update(kw)
    return config.resolve(environ=env, **args)  # type: ignore[arg-type]


def test_no_node_means_the_local_daemon(tmp_path: Path) -> None:
    s = resolve(env_for(tmp_path, None))
    (t,) = s.targets
    assert t.url == "http://127.0.0.1:8080"
    assert t.token_file == "/etc/smechvisord/token"
    assert t.token_sources == ("--token", "SPK_VISOR_TOKEN", "/etc/smechvisord/token")
    assert s.timeout == config.DEFAULT_TIMEOUT
    assert s.config_path is None


def test_named_nodes_groups_and_timeout_from_file(tmp_path: Path) -> None:
    env = env_for(tmp_path, GOOD)
    alpha = resolve(env, node="alpha")
    assert alpha.targets[0].url == "http://alpha.example:8080"
    assert alpha.targets[0].token_file == f"{tmp_path}/alpha.token"
    assert alpha.timeout == 4
    beta = resolve(env, node="beta").targets[0]
    assert beta.ssh == config.SshSpec(host="beta.example", user="admin", port=2222)
    assert beta.daemon_port == 9090
    assert beta.token_sources[-1] == "/etc/smechvisord/token on the node (SFTP)"
    rack = resolve(env, fleet="rack")
    assert [t.name for t in rack.targets] == ["alpha", "beta"]


def test_flag_beats_env_beats_file(tmp_path: Path) -> None:
    env = env_for(tmp_path, GOOD, SPK_VISOR_TIMEOUT="7", SPK_VISOR_TOKEN="from-env")
    s = resolve(env, node="alpha")
    assert s.timeout == 7
    assert s.targets[0].token == "from-env"
    assert s.targets[0].token_sources == ("SPK_VISOR_TOKEN",)
    s = resolve(env, node="alpha", timeout=2.5, token="from-flag")
    assert s.timeout == 2.5
    assert s.targets[0].token == "from-flag"


def test_urls_and_ssh_specs(tmp_path: Path) -> None:
    env = env_for(tmp_path, None)
    assert resolve(env, node="https://n1:8443/").targets[0].url == "https://n1:8443"
    assert resolve(env, ssh="n1").targets[0].ssh == config.SshSpec("n1")
    assert resolve(env, ssh="root@[::1]:22").targets[0].ssh == config.SshSpec("::1", "root", 22)
    for bad in ("ftp://x", "http://"):
        with pytest.raises(ConfigError, match="expected http"):
            resolve(env, node=bad)
    with pytest.raises(ConfigError, match=r"\[user@\]host"):
        resolve(env, ssh="a@b@c")
    with pytest.raises(ConfigError, match="only one of"):
        resolve(env, node="http://a:1", ssh="b")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1", "not a URL"),
        ("https://[zz]:8080", "not a URL"),
        ("http://h:99999", "port"),
        ("http://h:abc", "port"),
        ("http://:8080", "host"),
        ("http://admin:secret@h:8080", "user name or password"),
    ],
)
def test_malformed_node_urls_are_usage_errors(tmp_path: Path, url: str, message: str) -> None:
    # A typo in a URL is the user's mistake: a ConfigError (exit 2), never a ValueError
    # that surfaces as "internal error".
    env = env_for(tmp_path, f'[nodes.a]\nurl = "{url}"\n')
    for kw in ({"node": url}, {"node": "a"}):
        with pytest.raises(ConfigError, match=message) as info:
            resolve(env, **kw)
        assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("[nodes.a]\nurl = \n", "invalid TOML", "line 2"),
        # The line of the bad key itself, not its table's header.
        ("[nodes.a]\nurl = 'http://a:1'\ncolour = 'red'\n", "unknown key 'colour'", ":3"),
        ("[nodes.a]\nurl = 'http://a:1'\ndaemon_port = '1'\n", "must be an integer", ":3"),
        ("[nodes]\na = {{ url = 'http://a:1', colour = 'red' }}\n", "unknown key", ":2"),
        # Not the first line that merely contains the word (a comment, a URL).
        ("# rack\n[nodes.a]\nurl = 'http://rack:1'\n[groups]\nrack = ['x']\n", "not under", ":5"),
        ("# my node list\n[node.a]\nurl = 'http://a:1'\n", "unknown section 'node'", ":2"),
        ("[defaults]\n# timeout in s\ntimeout = 0\n", "positive number", ":3"),
        ("[nodes.a]\nssh = 'a'\nurl = 'http://a:1'\n", "exactly one of url or ssh", ":1"),
        ("[groups]\nrack = ['ghost']\n", "not under [nodes]", ":2"),
        ("[defaults]\ntimeout = -1\n", "positive number", ":2"),
        # inf, nan and 1e11 reached the socket layer: "timestamp out of range", exit 7.
        ("[defaults]\ntimeout = inf\n", "positive number", ":2"),
        ("[defaults]\ntimeout = nan\n", "positive number", ":2"),
        ("[defaults]\ntimeout = 1e11\n", "at most 86400", ":2"),
        ("[extra]\nx = 1\n", "unknown section", ":1"),
        # An empty group answered an empty table and exit 0; a repeated name ran twice.
        ("[nodes.a]\nurl = 'http://a:1'\n[groups]\nrack = []\n", "has no nodes", ":4"),
        ("[nodes.a]\nurl = 'http://a:1'\n[groups]\nrack = ['a', 'a']\n", "twice", ":4"),
        # daemon_port 0 or 99999 went to the SSH tunnel as is.
        ("[nodes.a]\nssh = 'a'\ndaemon_port = 0\n", "1..65535", ":3"),
        ("[nodes.a]\nssh = 'a'\ndaemon_port = 99999\n", "1..65535", ":3"),
        # Over HTTP the port is in the URL: a daemon_port there was silently ignored.
        ("[nodes.a]\nurl = 'http://a:1'\ndaemon_port = 9\n", "goes with ssh", ":3"),
    ],
)
def test_bad_config_names_file_and_line(tmp_path: Path, text: str, message: str, line: str) -> None:
    env = env_for(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        resolve(env)
    assert message in str(info.value)
    assert str(tmp_path / "config.toml") in str(info.value)
    assert line in str(info.value)
    assert info.value.exit_code == ExitCode.USAGE


def test_unknown_node_and_group_list_what_exists(tmp_path: Path) -> None:
    env = env_for(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"no node 'gamma' .*nodes: alpha, beta"):
        resolve(env, node="gamma")
    with pytest.raises(ConfigError, match=r"no group 'x' .*groups: rack"):
        resolve(env, fleet="x")


def test_local_token_file(tmp_path: Path) -> None:
    env = env_for(tmp_path, GOOD)
    target = resolve(env, node="alpha").targets[0]
    assert config.read_local_token(target) is None  # no file yet
    (tmp_path / "alpha.token").write_text("tok-123\n")
    assert config.read_local_token(target) == "tok-123"


def test_a_token_file_past_its_cap_is_refused_not_cut_short(tmp_path: Path) -> None:
    env = env_for(tmp_path, GOOD)
    target = resolve(env, node="alpha").targets[0]
    # Blank lines up to near the cap, then a token that runs past it: cut at the cap,
    # what is left would pass for a (wrong, shorter) token.
    token = "t" * 200
    (tmp_path / "alpha.token").write_text("\n" * 4000 + token + "\n")
    with pytest.raises(ConfigError, match=r"larger than 4096 bytes: not a token file"):
        config.read_local_token(target)


def test_inventory_in_defaults_is_a_fallback_after_groups(tmp_path: Path) -> None:
    (tmp_path / "hosts.ini").write_text(
        "[rack1]\nn1 ansible_host=10.1.0.1 ansible_user=ops ansible_port=2222\n"
        "[rack2]\nn2 ansible_host=10.1.0.2\n"
    )
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[defaults]\ninventory = "hosts.ini"\n'
        '[nodes.a]\nurl = "https://a:8080"\n[groups]\nrack1 = ["a"]\n'
    )
    env = {"SPK_VISOR_CONFIG": str(cfg)}
    # The file's own group wins; the inventory (relative to the file) fills in the rest.
    assert [t.name for t in resolve(env, fleet="rack1").targets] == ["a"]
    (target,) = resolve(env, fleet="rack2").targets
    assert target.ssh == config.SshSpec("10.1.0.2")
    # Named on the command line, the inventory is the only source of groups.
    (target,) = resolve(env, fleet="rack1", inventory=str(tmp_path / "hosts.ini")).targets
    assert (target.name, target.ssh) == ("n1", config.SshSpec("10.1.0.1", "ops", 2222))
    assert target.remote_token_file == config.NODE_TOKEN_FILE
    with pytest.raises(ConfigError, match=r"inventory file .* does not exist"):
        resolve({**env, "SPK_VISOR_INVENTORY": str(tmp_path / "nope")}, fleet="rack1")


def test_ssh_port_and_daemon_port_are_two_settings(tmp_path: Path) -> None:
    """`--ssh admin@node1:2222` names sshd's port; the daemon's is --daemon-port."""
    (t,) = resolve(env_for(tmp_path, None), ssh="admin@node1:2222", daemon_port=9000).targets
    assert (t.ssh, t.daemon_port) == (config.SshSpec("node1", "admin", 2222), 9000)
    (t,) = resolve(env_for(tmp_path, None), ssh="admin@node1").targets
    assert (t.ssh, t.daemon_port) == (config.SshSpec("node1", "admin", None), 8080)


def test_daemon_port_from_the_environment_goes_with_ssh(tmp_path: Path) -> None:
    env = env_for(tmp_path, None, SPK_VISOR_SSH="admin@node1", SPK_VISOR_DAEMON_PORT="9001")
    (t,) = resolve(env).targets
    assert t.daemon_port == 9001
    # The flag wins over the variable.
    (t,) = resolve(env, daemon_port=9002).targets
    assert t.daemon_port == 9002


@pytest.mark.parametrize("target", [{"node": "http://n:8080"}, {"fleet": "rack"}, {}])
def test_daemon_port_without_ssh_is_refused(tmp_path: Path, target: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="--daemon-port goes with --ssh") as e:
        resolve(env_for(tmp_path, GOOD), daemon_port=9000, **target)
    assert e.value.hint and "daemon_port" in e.value.hint


def test_a_daemon_port_in_the_ssh_spec_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        resolve(env_for(tmp_path, None), ssh="admin@node1:22:8080")
    assert e.value.message == "--ssh 'admin@node1:22:8080': expected [user@]host[:ssh_port]"
    assert (
        e.value.hint == "the :PORT is the SSH server's; name the daemon's port with --daemon-port"
    )


def test_a_token_far_longer_than_any_token_is_refused_by_name(tmp_path: Path) -> None:
    """A wrong file as token_file (a 5 MB log) went out as a 5 MB Authorization header,
    and the user read the daemon's "a header line is longer than 8190 bytes"."""
    big = tmp_path / "big.log"
    big.write_text("a" * 100_000)
    with pytest.raises(ConfigError, match=r"big\.log is not a token: 100000 characters") as info:
        config.check_token(big.read_text(), f"token file {big}")
    assert info.value.exit_code == ExitCode.USAGE
    assert config.check_token("  " + "b" * 64 + "\n", "--token") == "b" * 64


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("HTTP://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("Https://n1:8443/", "https://n1:8443"),
        ("hTTp://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_url_schemes_are_case_insensitive(tmp_path: Path, url: str, want: str) -> None:
    # RFC 3986 3.1: schemes are case-insensitive; the canonical form is lower case (what
    # the transport and the loopback check compare against).
    env = env_for(tmp_path, f'[nodes.a]\nurl = "{url}"\n')
    for kw in ({"node": url}, {"node": "a"}):
        assert resolve(env, **kw).targets[0].url == want
