"""Hostile state: record files anyone with access to the state dir could have written
(issue 11 #5, #9, #10), odd processes of other users (#7), one disk by two names (#4),
races on one name (#15), a full disk (#16), and two daemons on one state dir (issue 10)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import cli
from tests.support.daemon import Daemon, DaemonEnv, kill_vmms, wait_for
from tests.support.hostile import baseline, prove
from tests.support.vmhelpers import create_vm, pid_alive


def records(env: DaemonEnv) -> Path:
    return env.state_dir / "machines"


def write_record(env: DaemonEnv, dir_name: str, doc: Any) -> Path:
    d = records(env) / dir_name
    d.mkdir(parents=True, exist_ok=True)
    (d / "record.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return d


def good_record(env: DaemonEnv, vm_id: str) -> dict[str, Any]:
    """A valid record of a stopped VM, as the daemon writes them."""
    return {
        "id": vm_id,
        "uuid": "6f1c3a52-0000-4000-8000-000000000001",
        "cpus": 1,
        "memory_mb": 256,
        "disk": str(env.disk),
        "argv": ["cloud-hypervisor"],
        "created_at": 1700000000.0,
        "state": "stopped",
    }


@pytest.mark.parametrize("garbage", ["[]", "null", '"x"', '{"id": [1]}', "{}", '{"id": "a"'])
def test_one_bad_record_never_stops_the_daemon(daemon_env: DaemonEnv, garbage: str) -> None:
    """Every VM stays managed: the bad record is left alone, logged and listed as broken."""
    env = daemon_env
    d = Daemon(env)
    vm = create_vm(d, env, name="good")
    d.stop()  # VMs outlive the daemon
    write_record(env, "bad", garbage)
    d = Daemon(env)
    try:
        before = baseline(d)
        listed = {v["id"]: v for v in d.get("/api/vms").json if v["managed"]}
        assert listed["good"]["state"] == "running"
        assert listed["good"]["pid"] == vm["pid"]
        assert listed["bad"]["state"] == "broken"
        assert "record.json" in listed["bad"]["broken"]
        assert any("skipping unreadable VM record" in line for line in d.lines)
        # Broken means hands off: no start, no delete, no new VM over it.
        assert d.post("/api/vms/bad/start").status == 409
        assert d.request("DELETE", "/api/vms/bad").status == 409
        r = d.post("/api/vms", {"cpus": 1, "memory_mb": 256, "disk": str(env.disk), "name": "bad"})
        assert r.status == 409, r.raw
        assert (records(env) / "bad" / "record.json").read_text() == garbage
        prove(d, before)
    finally:
        d.stop()


def test_a_record_id_cannot_reach_outside_the_state_dir(daemon_env: DaemonEnv) -> None:
    """A record with the id `../../victim` turned DELETE into removing a folder outside the
    state dir."""
    env = daemon_env
    victim = env.root / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    write_record(env, "evil", {**good_record(env, "evil"), "id": "../../victim"})
    write_record(env, "other", {**good_record(env, "other"), "id": "not-other"})
    d = Daemon(env)
    try:
        before = baseline(d)
        assert before.vms == {"evil": "broken", "other": "broken"}
        for path in ("..%2F..%2Fvictim", "%2E%2E", "evil", "not-other"):
            r = d.request("DELETE", f"/api/vms/{path}")
            assert r.status in (404, 409), (path, r.raw)
            assert d.post(f"/api/vms/{path}/start").status in (404, 409)
        assert (victim / "precious").read_text() == "keep me"
        assert (records(env) / "evil" / "record.json").exists()
        prove(d, before)
    finally:
        d.stop()


@pytest.mark.parametrize(
    ("field", "value"),
    [("created_at", "yesterday"), ("created_at", None), ("cpus", "2"), ("cpus", True),
     ("argv", "cloud-hypervisor"), ("state", "dancing"), ("pid", -5), ("exit", [1])],
)  # fmt: skip
def test_a_record_of_the_wrong_types_is_broken_not_a_500(
    daemon_env: DaemonEnv, field: str, value: Any
) -> None:
    """A string `created_at` made GET /api/vms answer 500 until the file was fixed."""
    env = daemon_env
    write_record(env, "first", good_record(env, "first"))
    write_record(env, "odd", {**good_record(env, "odd"), field: value})
    d = Daemon(env)
    try:
        before = baseline(d)  # GET /api/vms answers 200
        assert before.vms == {"first": "stopped", "odd": "broken"}
        assert d.get("/api/vms/first").status == 200
        assert d.get("/api/vms/odd").status == 409
        prove(d, before)
    finally:
        d.stop()


def test_a_foreign_vmm_with_a_strange_command_line_does_not_break_the_listing(
    daemon_env: DaemonEnv,
) -> None:
    """Any local user can run a process called cloud-hypervisor."""
    d = Daemon(daemon_env)
    odd = subprocess.Popen(
        ["cloud-hypervisor", "-c", "import time; time.sleep(60)", "--cpus", "boot=²",
         "--memory", "size=٣G", "--disk", "path=\udcff"],
        executable=sys.executable,
    )  # fmt: skip
    try:
        before = baseline(d)

        def listed() -> list[dict[str, Any]]:
            r = d.get("/api/vms")
            assert r.status == 200, r.raw
            return [v for v in r.json if v["pid"] == odd.pid]

        found = wait_for(listed, timeout=10)
        assert len(found) == 1
        assert found[0]["managed"] is False
        assert found[0]["cpus"] is None
        prove(d, before)
    finally:
        odd.kill()
        odd.wait(timeout=5)
        d.stop()


@contextlib.contextmanager
def bind_mount(source: Path, target: Path) -> Iterator[Path]:
    target.touch()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_one_disk_by_any_name_runs_one_vm(daemon_env: DaemonEnv) -> None:
    """`ln disk.img hard.img`, then a VM on each name: 201 and 201 (the check compared
    path strings)."""
    if os.geteuid() != 0:
        pytest.skip("the bind-mount case needs root")
    env = daemon_env
    hard = env.images / "hard.img"
    os.link(env.disk, hard)
    soft = env.images / "soft.img"
    soft.symlink_to(env.disk)
    d = Daemon(env)
    try:
        first = create_vm(d, env, name="first")
        before = baseline(d)
        fd = os.open(env.disk, os.O_RDONLY)
        try:
            with bind_mount(env.disk, env.images / "bind.img") as bound:
                names = [hard, soft, bound, Path(f"/proc/{os.getpid()}/fd/{fd}")]
                for i, name in enumerate(names):
                    r = d.post(
                        "/api/vms",
                        {"cpus": 1, "memory_mb": 256, "disk": str(name), "name": f"second{i}"},
                    )
                    assert r.status == 409, (name, r.raw)
                    assert r.json["error"]["details"]["id"] == first["id"]
        finally:
            os.close(fd)
        prove(d, before)
        # Once the first VM is stopped, the same disk by another name is free again.
        assert d.post("/api/vms/first/stop").status == 200
        second = create_vm(d, env, name="second", disk=str(hard))
        assert second["state"] == "running"
        assert d.post("/api/vms/first/start").status == 409
    finally:
        d.stop()


def test_a_create_during_a_delete_of_the_same_name_is_a_409(daemon_env: DaemonEnv) -> None:
    """It answered 500 (FileExistsError), and the failed create then removed the same
    folder concurrently."""
    env = daemon_env
    d = Daemon(env)
    try:
        create_vm(d, env, name="race")
        assert d.post("/api/vms/race/stop").status == 200
        # A folder that takes a while to remove holds the window open.
        clutter = records(env) / "race" / "clutter"
        clutter.mkdir()
        for i in range(20000):
            (clutter / str(i)).touch()
        before = baseline(d)
        deleted: list[int] = []
        deleter = threading.Thread(
            target=lambda: deleted.append(d.request("DELETE", "/api/vms/race").status)
        )
        answers: list[int] = []
        deleter.start()
        while deleter.is_alive() or not answers:
            r = d.post(
                "/api/vms", {"cpus": 1, "memory_mb": 256, "disk": str(env.disk), "name": "race"}
            )
            answers.append(r.status)
            assert r.status in (409, 201), r.raw
            if r.status == 201:
                break
        deleter.join(timeout=60)
        assert deleted == [200]
        assert 409 in answers, answers  # the window was hit
        if answers[-1] != 201:
            create_vm(d, env, name="race")
        assert (records(env) / "race" / "record.json").is_file()
        assert not (records(env) / "race" / "clutter").exists()
        prove(d, before, vms={"race": "running"})
    finally:
        d.stop()


def test_a_second_daemon_on_the_same_state_dir_exits_2(daemon_env: DaemonEnv) -> None:
    env = daemon_env
    d = Daemon(env)
    try:
        create_vm(d, env, name="mine")
        before = baseline(d)
        second = subprocess.Popen(
            [sys.executable, "-m", "smechvisord"],
            env=env.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, err = second.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            second.kill()
            second.communicate(timeout=5)
            pytest.fail("the second daemon started on a state dir in use")
        assert second.returncode == 2, err
        assert f"PID {d.proc.pid}" in err
        assert "re-adopted" not in err
        prove(d, before)
    finally:
        d.stop()
    # The lock goes with the process: a restart is not blocked by a stale lock file.
    d = Daemon(env)
    try:
        assert [v["id"] for v in d.get("/api/vms").json if v["managed"]] == ["mine"]
    finally:
        d.stop()


# ---- a full disk -------------------------------------------------------------------


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the state dir, made and removed by this test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
                   check=True)  # fmt: skip
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(path: Path) -> Path:
    filler = path / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def on_disk(env: DaemonEnv, vm_id: str) -> str:
    return str(json.loads((records(env) / vm_id / "record.json").read_text())["state"])


def test_a_full_disk_gets_507_and_the_truth(tmp_path: Path, small_state: Path) -> None:
    """Create answered 500; stop and pause answered 500 although the VM did stop or pause,
    and the record said running until a restart."""
    env = DaemonEnv(tmp_path / "env")
    env.state_dir = small_state / "state"
    try:
        check_full_disk(env, small_state)
    finally:
        kill_vmms(env.run_dir)
        env.cleanup()


def check_full_disk(env: DaemonEnv, small_state: Path) -> None:
    d = Daemon(env)
    try:
        alpha = create_vm(d, env, name="alpha")
        create_vm(d, env, name="beta", disk=str(env.make_image("beta.img")))
        filler = fill(small_state)
        before = baseline(d)

        r = d.post("/api/vms/alpha/stop")
        assert r.status == 507, r.raw
        assert r.json["error"]["code"] == "insufficient_storage"
        assert "no space" in r.json["error"]["message"]
        assert r.json["error"]["details"]["vm"]["state"] == "stopped"
        assert d.get("/api/vms/alpha").json["state"] == "stopped"
        assert not pid_alive(alpha["pid"])

        r = d.post("/api/vms/beta/pause")
        assert r.status == 507, r.raw
        assert r.json["error"]["details"]["vm"]["state"] == "paused"
        assert d.get("/api/vms/beta").json["state"] == "paused"

        r = d.post("/api/vms", {"cpus": 1, "memory_mb": 256, "name": "gamma",
                                "disk": str(env.make_image("gamma.img"))})  # fmt: skip
        assert r.status == 507, r.raw
        assert "nothing was started" in r.json["error"]["message"]
        # The CLI says so too, with "operator needed" (9), not "internal error" (1).
        res = cli.run("--node", d.url, "--token", d.token, "vm", "create", "--cpus", "1",
                      "--memory", "256", "--disk", str(env.images / "gamma.img"))  # fmt: skip
        assert res.code == 9, res
        assert "no space left" in res.err
        assert d.get("/api/vms/gamma").status == 404
        assert not (records(env) / "gamma").exists()
        assert not (env.run_dir / "gamma.sock").exists()

        # The records still say running; once space returns they catch up on their own.
        assert on_disk(env, "alpha") == "running"
        filler.unlink()
        assert wait_for(lambda: on_disk(env, "alpha") == "stopped", timeout=10)
        assert wait_for(lambda: on_disk(env, "beta") == "paused", timeout=10)
        prove(d, before, vms={"alpha": "stopped", "beta": "paused"})
    finally:
        d.stop()
    # A restart reads what really happened (the VMs outlived the daemon).
    d = Daemon(env)
    try:
        assert {v["id"]: v["state"] for v in d.get("/api/vms").json if v["managed"]} == {
            "alpha": "stopped",
            "beta": "paused",
        }
    finally:
        d.stop()
