"""GET /api/images marks the images a live VM uses, and GET /api/node names the image dirs
(issue 10, #15: the dashboard pre-selected a disk a running VM had, and guessed the dirs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, DaemonEnv, kill_vmms
from tests.support.vmhelpers import create_vm


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    env = DaemonEnv(tmp_path / "node")
    env.make_image("free.img")
    d = Daemon(env)
    yield d
    d.stop()
    kill_vmms(env.run_dir)
    env.cleanup()


def _images(d: Daemon) -> dict[str, dict[str, object]]:
    reply = d.get("/api/images")
    assert reply.status == 200
    return {i["name"]: i for i in reply.json}


def test_images_in_use_name_their_vm_and_free_again_when_it_stops(daemon: Daemon) -> None:
    images = _images(daemon)
    assert images["disk.img"]["in_use"] is False and images["disk.img"]["used_by"] == []
    vm = create_vm(daemon, daemon.env)
    images = _images(daemon)
    assert images["disk.img"]["in_use"] is True
    assert images["disk.img"]["used_by"] == [vm["id"]]
    assert images["free.img"]["in_use"] is False and images["free.img"]["used_by"] == []
    reply = daemon.post(f"/api/vms/{vm['id']}/stop", {})
    assert reply.status == 200, reply.json
    images = _images(daemon)
    assert images["disk.img"]["in_use"] is False


def test_node_names_the_image_dirs(daemon: Daemon) -> None:
    doc = daemon.get("/api/node").json
    assert doc["image_dirs"] == [str(daemon.env.images)]
