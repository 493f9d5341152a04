"""A VMM smechvisord did not start is listed as `pid-N (unmanaged)`; `vm show pid-N`
must find it too (it answered "no VM named 'pid-N'"), and the actions it cannot take on
such a VMM are refused with the reason, not a 404."""

from __future__ import annotations

from tests.support.cli import run
from tests.support.daemon import Daemon, DaemonEnv, wait_for
from tests.support.schemas import UNMANAGED_VM_KEYS
from tests.support.vmhelpers import foreign_vmm, pid_alive


def test_an_unmanaged_vmm_can_be_shown_but_not_driven(
    daemon: Daemon, daemon_env: DaemonEnv
) -> None:
    with foreign_vmm(daemon_env) as proc:
        vm_id = f"pid-{proc.pid}"
        assert wait_for(lambda: daemon.get(f"/api/vms/{vm_id}").status == 200, timeout=10)
        doc = daemon.get(f"/api/vms/{vm_id}").json
        assert set(doc) == UNMANAGED_VM_KEYS
        assert doc["managed"] is False and doc["pid"] == proc.pid and doc["cpus"] == 3
        for method, path in [
            ("POST", f"/api/vms/{vm_id}/stop"),
            ("POST", f"/api/vms/{vm_id}/shutdown"),
            ("DELETE", f"/api/vms/{vm_id}"),
            ("GET", f"/api/vms/{vm_id}/console"),
        ]:
            r = daemon.request(method, path, {} if method == "POST" else None)
            assert r.status == 409, (path, r.json)
            assert r.json["error"]["message"] == (
                f"VM {vm_id} is a VMM smechvisord did not start (pid {proc.pid}): it is "
                "listed and shown, not driven; stop it where it was started"
            )
        assert pid_alive(proc.pid)
        node = ("--node", daemon.url, "--token", daemon.token)
        shown = run(*node, "vm", "show", vm_id)
        assert shown.code == 0, shown
        assert "Managed     no: a VMM that smechvisord did not start" in shown.out
        stopped = run(*node, "vm", "stop", vm_id)
        assert stopped.code == 3 and "did not start" in stopped.err, stopped
    # Gone: a 404 again, as for any id.
    assert wait_for(lambda: daemon.get(f"/api/vms/{vm_id}").status == 404, timeout=10)


def test_no_vm_may_take_an_unmanaged_vmms_id(daemon: Daemon, daemon_env: DaemonEnv) -> None:
    # A VM named pid-N would be one id for two VMs in `vm list`.
    body = {"cpus": 1, "memory_mb": 512, "disk": str(daemon_env.disk), "name": "pid-42"}
    r = daemon.post("/api/vms", body)
    assert r.status == 400, r.json
    assert r.json["error"]["details"]["field"] == "name"
    assert r.json["error"]["message"] == (
        "name: pid-N is the id of a VMM smechvisord did not start; choose another name"
    )
    r = daemon.post("/api/vms", {**body, "name": "pid-42x", "dry_run": True})
    assert r.status == 200, r.json
