"""A VM whose record cannot be read is listed as broken and refused: the refusal names the
file and the way out (it said only the JSON parser's complaint, leaving the operator to
find the record and guess that the daemon must be restarted)."""

from __future__ import annotations

from tests.support.daemon import Daemon, DaemonEnv


def test_a_broken_record_is_refused_with_its_path_and_the_way_out(
    daemon_env: DaemonEnv,
) -> None:
    bad = daemon_env.state_dir / "machines" / "broken"
    bad.mkdir(parents=True)
    (bad / "record.json").write_text("{not json")
    d = Daemon(daemon_env)
    try:
        for method, path in (("GET", "/api/vms/broken"), ("DELETE", "/api/vms/broken")):
            r = d.request(method, path)
            assert r.status == 409, r.json
            message = r.json["error"]["message"]
            assert message.startswith(
                f"the record of VM 'broken' cannot be read ({bad / 'record.json'}: "
            ), message
            assert message.endswith(
                f"repair it, or move {bad} out of the state dir, then restart smechvisord "
                "(rc-service smechvisord restart)"
            ), message
    finally:
        d.stop()
