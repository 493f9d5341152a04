"""`spk-visor image build`: the SmechVisor base image, its contents and contracts.

The image is built once per input hash (cached under .cache/image, as CI caches it), then
loop-mounted read-only and checked: OpenRC and no systemd, the services in their
runlevels, the boot paths, the trust root, the release tree, spk-visor running under the
image's own python, every package manager sealed, nothing per-node inside, the size goal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spk_visor.deploy import install
from spk_visor.image import ext4, nodefiles, rootfs, sources
from spk_visor.install import layout
from spk_visor.ota import nodeconf
from tests.support import image_build, shim_qemu
from tests.support.prereq import need_command, need_root

MIB = 1 << 20
SIZE_GOAL = 512 * MIB


def _prereqs() -> None:
    need_root()
    for tool, package in (
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("strip", "binutils"),
        ("zstd", "zstd"),
    ):
        need_command(tool, package)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _prereqs()
    doc, _run = image_build.build_image(tmp_path_factory.mktemp("image"))
    return doc


@pytest.fixture(scope="module")
def mnt(built: dict[str, Any]) -> Iterator[Path]:
    with image_build.mounted(Path(built["path"])) as path:
        yield path


def _in_image(mnt: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(mnt), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"},
    )


def _packages(mnt: Path) -> dict[str, str]:
    lines = (mnt / "usr/share/smechvisor/packages").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines if line)


def test_build_result_and_size(built: dict[str, Any]) -> None:
    path = Path(built["path"])
    assert path.stat().st_size == built["raw_bytes"]
    assert built["raw_bytes"] <= SIZE_GOAL, f"{built['raw_bytes'] / MIB:.0f} MiB raw"
    assert 0 < built["zstd_bytes"] < built["raw_bytes"]
    assert len(built["sha256"]) == 64
    assert built["vmm"] is False
    # The cache is keyed by the inputs: the image lives under .cache/image/<key>.
    assert built["key"][:32] in str(path)
    blkid = subprocess.run(
        ["blkid", "-o", "export", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "TYPE=ext4" in blkid
    assert "LABEL=smechvisor" in blkid


def test_second_build_is_the_cached_image(built: dict[str, Any], tmp_path: Path) -> None:
    doc, _ = image_build.build_image(tmp_path, "--out", str(tmp_path / "copy.img"))
    assert doc["cached"] is True
    assert doc["sha256"] == built["sha256"]
    assert doc["key"] == built["key"]
    assert image_build_sha256(tmp_path / "copy.img") == built["sha256"]


def test_overlay_lays_files_over_the_image(built: dict[str, Any], tmp_path: Path) -> None:
    """`--overlay DIR`: the built image with DIR's files laid over it (here a site's
    required health check), made from the cached image, cached itself, reproducible."""
    overlay = tmp_path / "site"
    check = overlay / "etc/spk-visor/health.d/required/50-site"
    check.parent.mkdir(parents=True)
    check.write_text("#!/bin/sh\nexit 0\n")
    check.chmod(0o755)
    (overlay / "etc/smechvisor-site").write_text("rack 7\n")
    doc, _ = image_build.build_image(tmp_path, "--overlay", str(overlay))
    # Its own cache entry (an earlier run of this test with the same base may have made
    # it already: then this first build is cached too).
    assert doc["key"] != built["key"]
    assert doc["kernel"] == built["kernel"] and doc["daemon_release"] == built["daemon_release"]
    with image_build.mounted(Path(doc["path"])) as mnt:
        placed = mnt / "etc/spk-visor/health.d/required/50-site"
        assert placed.read_text() == "#!/bin/sh\nexit 0\n"
        assert (placed.stat().st_mode & 0o777, placed.stat().st_uid) == (0o755, 0)
        assert (mnt / "etc/smechvisor-site").read_text() == "rack 7\n"
        # The image's own checks are still there: directories merge.
        assert (mnt / "etc/spk-visor/health.d/required/10-root-read-only").is_file()
    again, _ = image_build.build_image(tmp_path, "--overlay", str(overlay))
    assert again["cached"] is True and again["sha256"] == doc["sha256"]
    # The base image is untouched.
    assert image_build_sha256(Path(built["path"])) == built["sha256"]


def image_build_sha256(path: Path) -> str:
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def test_openrc_is_init_and_there_is_no_systemd(mnt: Path) -> None:
    packages = _packages(mnt)
    for name in ("sysvinit-core", "openrc", "python3", "openssh-server", "linux-image-amd64"):
        assert name in packages, name
    assert "systemd" not in packages
    assert "systemd-sysv" not in packages
    assert not (mnt / "lib/systemd/systemd").exists()
    init = (mnt / "sbin/init").resolve()
    assert init.is_file()
    # sysvinit's init runs rcS and rc from /etc/inittab; Debian's openrc makes them
    # `openrc sysinit` and `openrc default`.
    assert "/etc/init.d/rcS" in (mnt / "etc/inittab").read_text()
    assert "exec /sbin/openrc sysinit" in (mnt / "etc/init.d/rcS").read_text()
    assert "/sbin/openrc default" in (mnt / "etc/init.d/rc").read_text()
    assert (mnt / "sbin/openrc-run").is_file() or (mnt / "usr/sbin/openrc-run").is_file()


def test_services_are_in_their_runlevels(mnt: Path) -> None:
    for name in ("smechvisord", "spk-visor-ota", "vhost-user-gpu", "ssh", "cron"):
        link = mnt / "etc/runlevels/default" / name
        assert link.is_symlink(), name
        assert os.readlink(link) == f"/etc/init.d/{name}"
        script = mnt / "etc/init.d" / name
        assert script.is_file() and os.access(script, os.X_OK)
    assert (mnt / "etc/runlevels/sysinit/spk-visor-data").is_symlink()
    # The shipped scripts, byte for byte, with their settings files.
    shipped = Path(__file__).resolve().parents[2] / "smechvisord" / "openrc"
    for name in ("smechvisord", "spk-visor-ota", "vhost-user-gpu"):
        assert (mnt / "etc/init.d" / name).read_text() == (shipped / name).read_text()
        assert (mnt / "etc/conf.d" / name).is_file()


def _resolve_in(mnt: Path, rel: str) -> Path:
    """A path inside the image, following its links relative to the image's root."""
    path = mnt / rel
    for _ in range(10):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = mnt / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise AssertionError(f"{rel}: link loop")


def test_boot_contract(mnt: Path, built: dict[str, Any]) -> None:
    kernel = built["kernel"]
    vmlinuz = _resolve_in(mnt, "boot/vmlinuz")
    initrd = _resolve_in(mnt, "boot/initrd.img")
    assert vmlinuz.name == f"vmlinuz-{kernel}" and vmlinuz.stat().st_size > 1 << 20
    assert initrd.name == f"initrd.img-{kernel}" and initrd.stat().st_size > 1 << 20
    # Modules a node needs survived the pruning, and depmod knows them.
    dep = (mnt / "lib/modules" / kernel / "modules.dep").read_text()
    for module in ("virtio_net", "virtio_blk", "vfio-pci", "kvm-intel", "kvm-amd", "e1000e"):
        assert f"/{module}.ko" in dep, module
    assert "/sound/" not in dep and "drivers/net/wireless" not in dep


def test_trust_root_and_ota_defaults(mnt: Path) -> None:
    root_json = mnt / "usr/lib/spk-visor/root.json"
    assert root_json.read_bytes() == image_build.root_json_bytes()
    assert root_json.stat().st_mode & 0o222 == 0
    # The defaults parse, and name the slots as deploy lays out the disk.
    config = nodeconf.load_config(_paths_with_conf(mnt / "usr/share/spk-visor/ota.conf"))
    assert config.slots.a.endswith("/" + layout.PART_NAMES[2])
    assert config.slots.b.endswith("/" + layout.PART_NAMES[3])
    assert os.readlink(mnt / "etc/spk-visor/ota.conf") == "/data/etc/spk-visor/ota.conf"
    required = sorted((mnt / "etc/spk-visor/health.d/required").iterdir())
    assert required and all(os.access(p, os.X_OK) for p in required)


def _paths_with_conf(conf: Path) -> nodeconf.NodePaths:
    os.environ[nodeconf.CONF_ENV] = str(conf)
    return nodeconf.NodePaths(Path("/nonexistent"))


@pytest.fixture(autouse=True)
def _no_conf_override() -> Iterator[None]:
    saved = os.environ.pop(nodeconf.CONF_ENV, None)
    yield
    os.environ.pop(nodeconf.CONF_ENV, None)
    if saved is not None:
        os.environ[nodeconf.CONF_ENV] = saved


def test_node_files_live_on_data(mnt: Path) -> None:
    for rel, target in nodefiles.NODE_LINKS.items():
        assert os.readlink(mnt / rel) == target, rel
    # Nothing per node in the image: no host keys, no machine id, no logs.
    assert not list((mnt / "etc/ssh").glob("ssh_host_*"))
    assert list((mnt / "var/log").iterdir()) == []
    sshd = (mnt / "etc/ssh/sshd_config.d/smechvisor.conf").read_text()
    assert "AuthorizedKeysFile /data/etc/ssh/authorized_keys/%u" in sshd
    assert "HostKey /data/etc/ssh/ssh_host_ed25519_key" in sshd
    data_service = (mnt / "etc/init.d/spk-visor-data").read_text()
    assert "/data/etc/fstab" in data_service
    # The fstab deploy writes mounts its binds onto paths that exist in the image.
    for point in _deploy_fstab_targets():
        assert (mnt / point.lstrip("/")).is_dir(), point


def _deploy_fstab_targets() -> list[str]:
    """Mount points of the fstab deploy writes (install.Installer.fstab)."""

    class _Fake:
        data_uuid = "DATA"
        esp_uuid = "ESP"

    text = install.Installer.fstab(_Fake())  # type: ignore[arg-type]
    points = []
    for line in text.splitlines():
        fields = line.split()
        if line.startswith("#") or len(fields) < 2:
            continue
        points.append(fields[1])
    return [p for p in points if p != "/boot/efi"]


# root's PATH in a login shell (/etc/profile) and in an SSH command (Debian's sshd).
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _cron_jobs(text: str) -> list[tuple[list[str], str, str]]:
    """(time fields, user, command) of each job line of a /etc/cron.d file."""
    jobs = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#") or "=" in line.split()[0]:
            continue
        fields = line.split(None, 6)
        jobs.append((fields[:5], fields[5], fields[6]))
    return jobs


def test_the_node_pulls_from_cron(mnt: Path) -> None:
    """Debian's cron, in OpenRC's default runlevel, runs `ota pull` every 30 minutes. On a
    node with no repository in ota.conf (this image as built: no /data) the run prints
    nothing and exits 8, so cron has nothing to mail."""
    assert "cron" in _packages(mnt)
    entry = mnt / nodefiles.CRON_PATH
    # cron ignores a file in /etc/cron.d that group or others may write, or not root's.
    st = entry.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o644, 0), oct(st.st_mode)
    text = entry.read_text()
    jobs = _cron_jobs(text)
    assert len(jobs) == 1, text
    fields, user, command = jobs[0]
    assert fields == ["*/30", "*", "*", "*", "*"] and user == "root"
    assert command.startswith("spk-visor ota pull -q --jitter "), command
    path = re.search(r"^PATH=(\S+)$", text, re.M)
    assert path, text
    # The job's command, as cron runs it, in the image: silent, exit 8, no writes (the
    # image is mounted read-only here, as on a node).
    run = subprocess.run(
        ["chroot", str(mnt), "/bin/sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": path.group(1), "HOME": "/root", "SHELL": "/bin/sh", "LOGNAME": "root"},
    )
    assert (run.returncode, run.stdout, run.stderr) == (8, "", ""), run
    # The sealed package managers' daily jobs are gone (they would fail every day).
    for rel in rootfs.SEALED_CRON_JOBS:
        assert not (mnt / rel).exists(), rel


def test_smechvisord_is_on_roots_path_through_current(mnt: Path, built: dict[str, Any]) -> None:
    link = mnt / nodefiles.DAEMON_COMMAND
    # Through `current`, which an OTA daemon swap moves: never a fixed release.
    assert os.readlink(link) == "/opt/smechvisord/current/bin/smechvisord"
    run = subprocess.run(
        ["chroot", str(mnt), "smechvisord", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": ROOT_PATH, "HOME": "/root", "LC_ALL": "C.UTF-8"},
    )
    assert run.returncode == 0, run.stderr
    assert built["daemon_release"].startswith(run.stdout.split()[-1] + "-"), run.stdout
    # What the CLI's pinning messages tell an operator to run on the node: it runs (no
    # certificate in an image that never booted: it says where it will be).
    run = subprocess.run(
        ["chroot", str(mnt), "smechvisord", "--print-fingerprint"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": ROOT_PATH, "HOME": "/root", "LC_ALL": "C.UTF-8"},
    )
    assert "Traceback" not in run.stderr, run.stderr
    assert "no TLS certificate" in run.stderr or "SHA256 Fingerprint=" in run.stdout, run


def test_release_tree(mnt: Path, built: dict[str, Any]) -> None:
    current = mnt / "opt/smechvisord/current"
    assert os.readlink(current) == f"releases/{built['daemon_release']}"
    tree = mnt / "opt/smechvisord/releases" / built["daemon_release"]
    launcher = tree / "bin/smechvisord"
    assert launcher.is_file() and os.access(launcher, os.X_OK)
    assert launcher.read_text().startswith("#!/usr/bin/python3 ")
    assert (tree / "VERSION").read_text().strip() == built["daemon_release"].rsplit("-", 1)[0]
    assert any((tree / "lib/smechvisord/__pycache__").glob("*.pyc"))
    assert tree.stat().st_mode & 0o222 == 0
    # The daemon of the tree imports and checks itself under the image's python.
    run = _in_image(
        mnt, "/opt/smechvisord/current/bin/smechvisord", "--self-check", "--state-dir", "/tmp"
    )
    assert run.returncode in (0, 1), run.stderr
    assert "self-check" in run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "ModuleNotFoundError" not in run.stderr


def test_spk_visor_runs_under_the_image_python(mnt: Path, built: dict[str, Any]) -> None:
    run = _in_image(mnt, "/usr/bin/spk-visor", "--version")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == built["spk_visor_version"]
    assert run.stdout.startswith("spk-visor ")
    # The sealed verbs of the product refuse (exit 3), from the image's own CLI.
    for verb in ("system-install", "userland-install"):
        refused = _in_image(mnt, "/usr/bin/spk-visor", verb)
        assert refused.returncode == 3, (verb, refused.stderr)
    # Its dependencies came from wheels (dist-info), with compiled extension modules.
    lib = mnt / "usr/lib/spk-visor/python"
    names = {p.name.split("-")[0].lower() for p in lib.glob("*.dist-info")}
    deps = tomllib.loads((image_build.REPO / "pyproject.toml").read_text())["project"]
    for requirement in deps["dependencies"]:
        name = requirement.split(">")[0].split("<")[0].split("=")[0].strip().lower()
        assert name.replace("-", "_") in names, name
    assert "spk_visor" in names


def test_sealed(mnt: Path) -> None:
    for command in ("apt", "apt-get", "dpkg", "pip", "pip3"):
        run = _in_image(mnt, command, "install", "curl")
        assert run.returncode != 0, command
        assert "sealed" in run.stderr, (command, run.stderr)
    run = _in_image(mnt, "/usr/bin/python3", "-m", "pip", "--version")
    assert run.returncode != 0
    run = _in_image(mnt, "/usr/bin/python3", "-m", "ensurepip")
    assert run.returncode != 0
    assert rootfs.compilers(mnt) == []
    for gone in ("var/lib/dpkg", "var/lib/apt", "etc/apt", "var/cache/apt"):
        assert not (mnt / gone).exists(), gone


def test_image_is_read_only_shaped(mnt: Path) -> None:
    fstab = (mnt / "etc/fstab").read_text()
    assert "tmpfs /tmp tmpfs" in fstab
    # checkroot.sh remounts / read-write unless fstab says ro.
    root_line = [line.split() for line in fstab.splitlines() if line.split()[1:2] == ["/"]]
    assert root_line and "ro" in root_line[0][3].split(","), fstab
    assert os.readlink(mnt / "etc/resolv.conf") == "/run/resolv.conf"
    assert (mnt / "data").is_dir()
    for docs in ("usr/share/man", "usr/share/info"):
        assert not any((mnt / docs).rglob("*.gz")) if (mnt / docs).exists() else True


# ---- without building an image --------------------------------------------------------


def test_host_sources_keeps_only_the_suite(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://mirror.invalid/other\nSuites: nodistro\nComponents: main\n"
    )
    (apt / "sources.list.d" / "old.list.disabled").write_text(
        "deb http://x.invalid bookworm main\n"
    )
    text = sources.host_sources("bookworm", apt)
    assert "mirror.invalid/debian" in text
    assert "nodistro" not in text and "x.invalid" not in text
    (apt / "sources.list.d" / "debian.sources").unlink()
    (apt / "sources.list").write_text(
        "deb [arch=amd64] http://one.invalid/debian bookworm main\n"
        "deb http://two.invalid/debian trixie main\n"
    )
    text = sources.host_sources("bookworm", apt)
    assert "one.invalid" in text and "two.invalid" not in text
    (apt / "sources.list").write_text("# nothing\n")
    with pytest.raises(Exception, match="no sources for Debian bookworm"):
        sources.host_sources("bookworm", apt)


def test_ext4_is_reproducible_whatever_the_times(tmp_path: Path) -> None:
    """Two images of the same tree staged at different times are the same bytes: the
    staging host's ctimes and atimes do not leak into the image."""
    need_command("mkfs.ext4", "e2fsprogs")
    need_command("debugfs", "e2fsprogs")
    digests = []
    for n in range(2):
        tree = tmp_path / f"tree{n}"
        (tree / "etc/deep/er").mkdir(parents=True)
        (tree / "etc/deep/er/file").write_text("same\n")
        (tree / "etc/link").symlink_to("deep/er/file")
        (tree / "bin").mkdir()
        (tree / "bin/tool").write_text("#!/bin/sh\n")
        (tree / "bin/tool").chmod(0o755)
        if n:
            # Later ctimes (a chmod), different atimes (a read).
            os.chmod(tree / "bin/tool", 0o700)
            os.chmod(tree / "bin/tool", 0o755)  # noqa: S103 (the same mode, a later ctime)
            (tree / "etc/deep/er/file").read_text()
        work = tmp_path / f"work{n}"
        work.mkdir()
        out = tmp_path / f"img{n}"
        ext4.make(tree, out, key="ab" * 32, epoch=1_700_000_000, work=work, label="t")
        digests.append(image_build_sha256(out))
        if not n:
            subprocess.run(["sleep", "1.1"], check=True)
    assert digests[0] == digests[1]


def test_bad_input_exits_2_and_builds_nothing(tmp_path: Path) -> None:
    need_root()
    before = _cache_entries()
    root_json = tmp_path / "root.json"
    root_json.write_bytes(image_build.root_json_bytes())
    cases = [
        (["--root", str(tmp_path / "missing.json")], "trust root"),
        (["--root", str(root_json), "--vmm", str(tmp_path / "no-vmm")], "--vmm"),
        (["--root", str(root_json), "--daemon-tree", str(tmp_path)], "bin/smechvisord"),
    ]
    bad_root = tmp_path / "bad.json"
    bad_root.write_text("{}")
    cases.append((["--root", str(bad_root)], f"{bad_root} is not a root document"))
    for args, words in cases:
        run = subprocess.run(
            [sys.executable, "-m", "spk_visor", "image", "build", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=image_build.REPO,
        )
        assert run.returncode in (2, 3), (args, run.returncode, run.stderr)
        assert words in run.stderr, (args, run.stderr)
        assert "internal error" not in run.stderr
    assert _cache_entries() == before


def _cache_entries() -> set[str]:
    cache = image_build.REPO / ".cache" / "image"
    return {p.name for p in cache.iterdir()} if cache.is_dir() else set()


# ---- booting it -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(port: int) -> dict[str, Any] | None:
    """/api/health over HTTPS: through QEMU's port forward the guest sees a peer that is not
    its loopback, and a node speaks only TLS to those. The certificate is the one the node
    made at its first start, so this probe checks the handshake, not the chain."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/api/health", timeout=3, context=context
        ) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc
    except (OSError, ValueError):
        return None


def test_boots_under_qemu_and_openrc_starts_smechvisord(
    built: dict[str, Any], mnt: Path, tmp_path: Path
) -> None:
    """The image's own kernel and initramfs boot it (root=/dev/vda, read-only) under QEMU
    TCG; OpenRC starts smechvisord, which answers /api/health through a forwarded port."""
    need_command("qemu-system-x86_64", "qemu-system-x86")
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    shutil.copyfile(_resolve_in(mnt, "boot/vmlinuz"), kernel)
    shutil.copyfile(_resolve_in(mnt, "boot/initrd.img"), initrd)
    port = _free_port()
    log = tmp_path / "console.log"
    argv = [
        *("qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-smp", "2", "-m", "1024"),
        *("-nographic", "-monitor", "none", "-serial", f"file:{log}", "-no-reboot"),
        *("-kernel", str(kernel), "-initrd", str(initrd)),
        *("-append", "root=/dev/vda ro console=ttyS0,115200 smechvisor.slot=a panic=-1"),
        *("-drive", f"file={built['path']},format=raw,if=virtio,readonly=on"),
        *("-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:8080"),
        *("-device", "virtio-net-pci,netdev=n0"),
    ]
    answers: list[dict[str, Any]] = []

    def healthy(_text: str) -> bool:
        doc = _health(port)
        if doc is not None:
            answers.append(doc)
        return doc is not None

    boot = shim_qemu.watch(
        argv, log, tmp_path, until=re.compile(r"Starting smechvisord"), timeout=420.0,
        while_running=healthy,
    )  # fmt: skip
    (Path(os.environ.get("SPK_IMAGE_BOOT_LOG", tmp_path / "kept.log"))).write_text(boot.log)
    tail = boot.log[-4000:]
    assert boot.matched, f"smechvisord did not answer in {boot.seconds:.0f} s; console:\n{tail}"
    assert answers[-1]["status"] == "ok"
    assert built["daemon_release"].startswith(answers[-1]["version"] + "-")
    # OpenRC, not systemd, brought it up, after the data service.
    assert "OpenRC" in boot.log
    data = boot.log.index("Mounting the data partition")
    ota = boot.log.index("Checking a trial boot of the base system (after recovering")
    assert data < ota < boot.log.index("Starting smechvisord")
    # The read-only root costs no boot service (vhost-user-gpu has no backend in the image).
    failed = re.findall(r"ERROR: (\S+) failed to start", boot.log)
    assert failed == ["vhost-user-gpu"], failed
    # Debian's cron, through its LSB script under OpenRC: the node's own pull schedule.
    assert "Starting periodic command scheduler: cron." in boot.log
    # One spk-visor start for the OTA boot work: boot-check recovers first.
    assert "Recovering interrupted OTA work" not in boot.log
    # No data partition next to /dev/vda: the node said so and used a tmpfs.
    assert "no partition named data" in boot.log


def test_cache_keeps_the_newest_entries(tmp_path: Path) -> None:
    from spk_visor.image import build  # noqa: PLC0415

    names = [f"{n:032x}" for n in range(5)]
    for age, name in enumerate(names):
        for directory in (tmp_path / name, tmp_path / "wheels" / name):
            directory.mkdir(parents=True)
            os.utime(directory, (1000 - age, 1000 - age))
        tree = tmp_path / "debootstrap" / f"{name}.tar.zst"
        tree.parent.mkdir(exist_ok=True)
        tree.write_bytes(b"x")
        os.utime(tree, (1000 - age, 1000 - age))
    # The entry just built counts as kept even when it is not among the newest.
    removed = build.prune_cache(tmp_path, keep={names[4]}, entries=3)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("wheels", "debootstrap"))
    assert left == sorted([names[0], names[1], names[4]])
    assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == left
    assert len(list((tmp_path / "debootstrap").iterdir())) == 3
    assert removed
