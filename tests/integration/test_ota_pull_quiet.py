"""What `ota pull` says, by outcome: the cron form (-q) is silent on success, on a no-op
and when nothing may be done now (exit 0, 77, 8), and otherwise prints exactly one line on
stderr naming the cause, since cron mails stderr. Without -q, every outcome is said in
words, an up-to-date node included (with the version).

The pulls are real (a repository served on 127.0.0.1); the rollback is a real worker whose
release fails its preflight, so no OpenRC is needed.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from spk_visor.errors import ExitCode
from spk_visor.ota import build, journal
from spk_visor.ota.bundle import MAGIC
from spk_visor.ota.repo import Repo
from tests.support import cli
from tests.support.flaky_repo import FlakyRepo, closed_port_url
from tests.support.ota_pki import Node, Pki, stub_worker

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def pki(ota_pki: Pki) -> Pki:
    return ota_pki


@pytest.fixture
def node(ota_node: Node) -> Node:
    return ota_node


def conf(node: Node, urls: list[str], **extra: object) -> None:
    # One attempt: each outcome class is reached without waiting out retries.
    node.write_pull_conf(urls, **{"fetch_attempts": 1, **extra})


def publish(
    tmp_path: Path,
    pki: Pki,
    repo_dir: Path,
    *,
    launcher: str = "#!/bin/sh\nexit 0\n",
    expires: dt.timedelta = dt.timedelta(days=7),
    percent: float = 100,
) -> str:
    """Release 0.2.0 (a valid tree: launcher, version) on channel stable."""
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "smechvisord").write_text(launcher)
    (tree / "bin" / "smechvisord").chmod(0o755)
    (tree / "lib" / "smechvisord").mkdir(parents=True)
    (tree / "lib" / "smechvisord" / "version.py").write_text('VERSION = "0.2.0"\n')
    built = build.build(
        out=tmp_path / "b.spkb", version="0.2.0", counter=2, keys=pki.release, daemon_tree=tree
    )
    r = Repo(repo_dir)
    sha, _m = r.add_bundle(built.bundle)
    r.sign_channel("stable", pki.channel, manifest_sha=sha, expires_in=expires, percent=percent)
    return sha


def pull(node: Node, *args: str) -> cli.Result:
    return cli.run("ota", "pull", *args, env=node.env)


def silent(res: cli.Result, code: int) -> None:
    assert res.code == code, res
    assert res.out == "" and res.err == "", res


def one_line(res: cli.Result, code: int, *words: str) -> str:
    assert res.code == code, res
    assert res.out == "", res
    lines = res.err.splitlines()
    assert len(lines) == 1, res.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_no_op_is_silent_under_q_and_says_up_to_date_on_a_terminal(
    tmp_path: Path, pki: Pki, node: Node
) -> None:
    repo_dir = tmp_path / "repo"
    sha = publish(tmp_path, pki, repo_dir)
    with FlakyRepo(repo_dir) as server:
        conf(node, [server.url])
        # Downloaded, not applied (policy): success, silent under -q ...
        silent(pull(node, "-q"), 0)
        # ... and said in words without it.
        res = pull(node)
        assert res.code == 0 and "0.2.0" in res.out and "not applied" in res.out, res
        assert "--apply-daemon" in res.out, res.out
        # The release is installed: a no-op.
        m = Repo(repo_dir).load_manifest(sha)
        assert m.daemon is not None
        node.ctx().installed.record(
            "daemon", {"pack": m.daemon.pack, "version": "0.2.0"}, sha, 2, "0.2.0"
        )
        silent(pull(node, "-q"), 0)
        silent(pull(node, "-q", "--unchanged-exit-77"), 77)
        res = pull(node)
        assert res.code == 0, res
        assert "up to date" in res.out and "0.2.0" in res.out, res.out
        assert "None" not in res.out + res.err


def test_rollback_prints_one_line_naming_the_cause(tmp_path: Path, pki: Pki, node: Node) -> None:
    """The issue's case: a cron pull that rolled back (exit 5) printed nothing."""
    repo_dir = tmp_path / "repo"
    publish(
        tmp_path, pki, repo_dir, launcher="#!/bin/sh\necho 'cannot open the state' >&2\nexit 1\n"
    )
    with FlakyRepo(repo_dir) as server:
        conf(node, [server.url], apply_daemon=True)
        line = one_line(pull(node, "-q"), ExitCode.ROLLED_BACK, "0.2.0", "rolled back")
        assert "preflight failed" in line and "cannot open the state" in line, line
        # Tried once: the next cron run skips the release it rolled back (exit 8, silent).
        silent(pull(node, "-q"), ExitCode.NOT_ELIGIBLE)


def test_success_is_silent_under_q(
    tmp_path: Path, pki: Pki, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An applied update: the worker is replaced (the swap has its own OpenRC tests)."""

    stub_worker(monkeypatch)
    repo_dir = tmp_path / "repo"
    publish(tmp_path, pki, repo_dir)
    with FlakyRepo(repo_dir) as server:
        conf(node, [server.url], apply_daemon=True)
        silent(pull(node, "-q"), 0)
        res = pull(node)
        assert res.code == 0 and "0.2.0" in res.out and "applied" in res.out, res


def test_no_repository_is_silent_under_q(node: Node) -> None:
    """A node with no base_urls does not pull: the image's cron entry runs every 30
    minutes on every node, and cron mails what it prints. Nothing may be done (exit 8),
    silently under -q, in words on a terminal."""
    conf(node, [])
    before = node.tree_digest()
    silent(pull(node, "-q", "--jitter", "900"), ExitCode.NOT_ELIGIBLE)
    res = pull(node)
    assert res.code == ExitCode.NOT_ELIGIBLE and res.out == "", res
    assert "no repository configured" in res.err and "base_urls" in res.err, res.err
    # It changed nothing on the node (no state, no backoff, no journal).
    assert node.tree_digest() == before
    # No ota.conf at all (a node before its first configuration): the same.
    node.paths.conf.unlink()
    silent(pull(node, "-q"), ExitCode.NOT_ELIGIBLE)


def test_refusals_and_failures_print_one_line_each(tmp_path: Path, pki: Pki, node: Node) -> None:
    # Configuration (exit 2): an ota.conf that does not parse.
    node.write_conf("base_urls = [\n")
    one_line(pull(node, "-q"), ExitCode.USAGE, "ota.conf")
    # Transient (exit 7): nothing listens.
    conf(node, [closed_port_url()])
    one_line(pull(node, "-q"), ExitCode.TRANSIENT)
    # Backing off after it (exit 7 again, for the same reason, until the backoff ends).
    one_line(pull(node, "-q"), ExitCode.TRANSIENT, "backing off")
    node.paths.state_dir.joinpath("pull.json").unlink()
    # Refused (exit 3): an expired channel.
    repo_dir = tmp_path / "repo"
    publish(tmp_path, pki, repo_dir, expires=dt.timedelta(seconds=-60))
    with FlakyRepo(repo_dir) as server:
        conf(node, [server.url])
        one_line(pull(node, "-q"), ExitCode.REFUSED, "expired")
        # Busy (exit 6): another OTA operation holds the lock.
        with journal.locked(node.paths, "test"):
            one_line(pull(node, "-q"), ExitCode.BUSY, "another OTA operation")


def test_not_eligible_is_silent_under_q(tmp_path: Path, pki: Pki, node: Node) -> None:
    """Outside the rollout: nothing may be done now, and every cron run would say so."""
    repo_dir = tmp_path / "repo"
    publish(tmp_path, pki, repo_dir, percent=0)
    with FlakyRepo(repo_dir) as server:
        conf(node, [server.url])
        silent(pull(node, "-q"), ExitCode.NOT_ELIGIBLE)
        res = pull(node)
        assert res.code == ExitCode.NOT_ELIGIBLE and "rollout" in res.err, res


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--channel", "a/b"), ("channel",)),  # checked before the node is read
        (("--bogus",), ("--bogus",)),  # an option the command does not have
        (("--jitter", "-1"), ("--jitter",)),  # out of the option's range
    ],
)
def test_command_line_mistakes_print_one_line_under_q(
    node: Node, args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    """A typo in a crontab line is mailed on every run: under -q it is one line too,
    not a usage block or a message with its hint on a second line."""
    conf(node, [closed_port_url()])
    one_line(pull(node, "-q", *args), ExitCode.USAGE, *words)
    one_line(pull(node, *args, "--quiet"), ExitCode.USAGE, *words)


@pytest.mark.parametrize(
    ("raised", "code", "words"),
    [
        # An OSError about a path the user named: exit 2, the path and its hint.
        ("path", ExitCode.USAGE, ("bundle.spkb",)),
        # A bug: "internal error" and the --verbose hint.
        ("bug", ExitCode.INTERNAL, ("internal error", "--verbose")),
    ],
)
def test_unexpected_failures_print_one_line_under_q(
    tmp_path: Path,
    node: Node,
    monkeypatch: pytest.MonkeyPatch,
    raised: str,
    code: int,
    words: tuple[str, ...],
) -> None:
    """The failures main() reports itself (not an SpkVisorError) keep to one line too."""
    bundle = tmp_path / "bundle.spkb"
    bundle.write_bytes(MAGIC)  # starts like a bundle: apply_stream is reached

    def fail(*_args: object, **_kwargs: object) -> None:
        if raised == "path":
            raise PermissionError(13, "Permission denied", str(bundle))
        raise RuntimeError("boom")

    monkeypatch.setattr("spk_visor.ota.engine.apply_stream", fail)
    res = cli.run("ota", "apply", "-q", "--bundle", str(bundle), env=node.env)
    one_line(res, code, *words)
    # Combined short flags: -q then -b and its value.
    one_line(cli.run("ota", "apply", "-qb", str(bundle), env=node.env), code, *words)
    # Without -q: the hint on a line of its own.
    res = cli.run("ota", "apply", "--bundle", str(bundle), env=node.env)
    assert res.code == code and len(res.err.splitlines()) == 2, res


def test_an_option_value_that_reads_q_is_not_quiet(node: Node) -> None:
    """`--token -q`: "-q" is the token, not the cron form; the hint keeps its own line."""
    res = cli.run("--node", closed_port_url(), "--token", "-q", "node", env=node.env)
    assert res.code == ExitCode.TRANSIENT, res
    assert len(res.err.splitlines()) == 2, res.err


@pytest.mark.parametrize(
    "args",
    [
        # The value of a subcommand's option that reads -q, then a mistake.
        ("ota", "pull", "--channel", "-q", "--bogus"),
        ("ota", "pull", "--channel", "--quiet", "--bogus"),
        ("ota", "pull", "--jitter", "-qx"),
        ("entire-system-upgrade", "--channel", "-q", "--bogus"),  # the alias, at the root
        ("ota", "publish", "--repo", "-q", "--key", "k", "--bogus"),
        ("ota", "check", "--bundle", "-q", "--bogus"),
        ("ota", "apply", "-b", "-q", "--bogus"),
        # A root option's value, then a subcommand option's.
        ("--token", "-q", "ota", "pull", "--channel", "-q", "--bogus"),
        # A word before the subcommand's name is not its option's value.
        ("--node", "pull", "ota", "pull", "--channel", "-q", "--bogus"),
    ],
)
def test_a_subcommand_option_value_that_reads_q_is_not_quiet(
    node: Node, args: tuple[str, ...]
) -> None:
    """`ota pull --channel -q --bogus`: "-q" is the channel's name, so the usage error is
    not the cron form's one line; it keeps its usage block."""
    res = cli.run(*args, env=node.env)
    assert res.code == ExitCode.USAGE, res
    assert res.err.startswith("Usage: spk-visor"), res.err
    assert len(res.err.splitlines()) > 1, res.err


@pytest.mark.parametrize(
    "args",
    [
        ("ota", "pull", "-q", "--channel", "x", "--bogus"),
        ("ota", "pull", "--channel", "x", "-q", "--bogus"),
        ("--token", "t", "ota", "pull", "--jitter", "1", "--quiet", "--bogus"),
        ("ota", "apply", "-qb", "-q", "--bogus"),
    ],
)
def test_q_after_option_values_is_still_quiet(node: Node, args: tuple[str, ...]) -> None:
    res = cli.run(*args, env=node.env)
    assert res.code == ExitCode.USAGE, res
    assert len(res.err.splitlines()) == 1 and "--bogus" in res.err, res.err


def one_line_beside_json(res: cli.Result, code: int, *words: str) -> None:
    """`-q --json`: the JSON on stdout (each line a document) and still one line on
    stderr, which is what cron mails."""
    assert res.code == code, res
    docs = [json.loads(line) for line in res.out.splitlines()]
    assert docs, res
    last = docs[-1]
    assert last.get("exit_code", last.get("error", {}).get("exit_code")) == code, docs
    lines = res.err.splitlines()
    assert len(lines) == 1, res.err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_quiet_with_json_still_says_each_failure_on_one_line(
    tmp_path: Path, pki: Pki, node: Node
) -> None:
    """`ota pull -q --json` (a cron job that also keeps the JSON): an error printed its
    message and hint on two lines, and a rollback nothing at all on stderr."""
    conf(node, [closed_port_url()])
    one_line_beside_json(pull(node, "-q", "--json"), ExitCode.TRANSIENT, "connection refused")
    node.paths.state_dir.joinpath("pull.json").unlink()
    repo_dir = tmp_path / "repo"
    publish(
        tmp_path, pki, repo_dir, launcher="#!/bin/sh\necho 'cannot open the state' >&2\nexit 1\n"
    )
    with FlakyRepo(repo_dir) as server:
        conf(node, [server.url], apply_daemon=True)
        one_line_beside_json(
            cli.run("--json", "ota", "pull", "-q", env=node.env),
            ExitCode.ROLLED_BACK,
            "rolled back",
        )
