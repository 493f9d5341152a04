"""The cloud-hypervisor v42 stand-in, run as a real process: command line, exits, API, files.

The daemon's tests trust the stand-in to behave like v42; these tests pin that behaviour.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.unixhttp import UnixHTTPConnection, call, read_reply

BIN = Path(__file__).resolve().parents[1] / "support" / "bin" / "cloud-hypervisor"
NO_KVM = (
    "Failed to open hypervisor interface (is hypervisor interface available?): "
    "Failed to create the hypervisor: no supported hypervisor"
)
TIMEOUT = 10.0


def wait_until(cond: Any, timeout: float = TIMEOUT, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


def read_events(path: Path) -> list[dict[str, Any]]:
    """v42 writes pretty-printed JSON objects separated by blank lines, not JSON lines."""
    text = path.read_text()
    decoder = json.JSONDecoder()
    events: list[dict[str, Any]] = []
    i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return events
        obj, i = decoder.raw_decode(text, i)
        events.append(obj)


def names(events: list[dict[str, Any]]) -> list[str]:
    return [f"{e['source']}/{e['event']}" for e in events if e["source"] != "virtio-device"]


class Box:
    """A short /tmp directory (AF_UNIX paths stop at 108 bytes) with a sysroot that has
    /dev/kvm, a firmware file and a disk image; every process started here is killed at
    the end by its PID."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ch", dir="/tmp"))
        self.sysroot = self.dir / "root"
        (self.sysroot / "dev").mkdir(parents=True)
        (self.sysroot / "dev" / "kvm").write_bytes(b"")
        self.firmware = self.dir / "CLOUDHV.fd"
        self.firmware.write_bytes(b"\0" * 4096)
        self.disk = self.dir / "disk.img"
        with self.disk.open("wb") as f:
            f.truncate(1 << 20)
        self.sock = self.dir / "api.sock"
        self.serial = self.dir / "serial.log"
        self.events = self.dir / "events.json"
        self.log = self.dir / "vmm.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._n = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CH_STANDIN_")}
        env["CH_STANDIN_SYSROOT"] = str(self.sysroot)
        env.update(extra)
        return env

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """For command lines that end quickly on their own."""
        return subprocess.run(
            [str(BIN), *args],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def start(self, *args: str, **env: str) -> Proc:
        self._n += 1
        out = self.dir / f"stdout.{self._n}"
        err = self.dir / f"stderr.{self._n}"
        with out.open("wb") as o, err.open("wb") as e:
            p = subprocess.Popen(
                [str(BIN), *args], env=self.env(**env), stdin=subprocess.DEVNULL, stdout=o, stderr=e
            )
        self.procs.append(p)
        return Proc(p, out, err)

    def vm_args(self, *extra: str) -> list[str]:
        return [
            "--api-socket",
            f"path={self.sock}",
            "--event-monitor",
            f"path={self.events}",
            "--log-file",
            str(self.log),
            "-v",
            "--cpus",
            "boot=2",
            "--memory",
            "size=1G",
            "--firmware",
            str(self.firmware),
            "--disk",
            f"path={self.disk}",
            "--serial",
            f"file={self.serial}",
            "--console",
            "off",
            "--platform",
            "uuid=4b1a6bd0-7c1f-4b7e-9a53-3c54e6d3a0f1",
            *extra,
        ]

    def boot(self, *extra: str, **env: str) -> Proc:
        proc = self.start(*self.vm_args(*extra), **env)
        proc.wait_ready(self.sock)
        return proc

    def api(self, method: str, endpoint: str, body: bytes | None = None) -> Any:
        return call(str(self.sock), method, endpoint, body=body)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)


class Proc:
    def __init__(self, p: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.p = p
        self.out = out
        self.err = err

    @property
    def pid(self) -> int:
        return self.p.pid

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.p.wait(timeout)

    def wait_ready(self, sock: Path) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"exited {self.p.returncode}: {self.stderr()}")
            if not sock.exists():
                return False
            try:
                return bool(call(str(sock), "GET", "vmm.ping", timeout=1).status == 200)
            except OSError:
                return False

        assert wait_until(ready), "the stand-in did not answer vmm.ping"


@pytest.fixture
def box() -> Iterator[Box]:
    b = Box()
    yield b
    b.close()


# -- command line ------------------------------------------------------------------------


def test_version_and_help(box: Box) -> None:
    r = box.run("-V")
    assert (r.returncode, r.stdout) == (0, "cloud-hypervisor v42.0\n")
    r = box.run("--version", "-v")
    assert r.returncode == 0
    assert r.stdout.splitlines()[1].startswith("Enabled features: [")
    r = box.run("-h")
    assert r.returncode == 0
    assert "Usage: cloud-hypervisor [OPTIONS]" in r.stdout
    assert "--api-socket <api-socket>" in r.stdout
    # clap's arg_required_else_help: no arguments at all is a usage error.
    r = box.run()
    assert r.returncode == 2
    assert "Usage:" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "error: unexpected argument '--bogus' found"),
        (["--dsik", "path=/x"], "tip: a similar argument exists: '--disk'"),
        (
            ["--disk", "path=/a", "--disk", "path=/b"],
            "error: the argument '--disk <disk>...' cannot be used multiple times",
        ),
        (
            ["--cpus", "boot=1", "--cpus=boot=2"],
            "error: the argument '--cpus <cpus>' cannot be used multiple times",
        ),
        (["--kernel"], "error: a value is required for '--kernel <kernel>' but none was supplied"),
        (["--seccomp", "maybe"], "error: invalid value 'maybe' for '--seccomp <seccomp>'"),
        (["--kernel", "/k", "stray"], "error: unexpected argument 'stray' found"),
    ],
)
def test_clap_rejections_exit_2(box: Box, args: list[str], message: str) -> None:
    r = box.run(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not box.sock.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cpus", "4"], "Error parsing config: Error parsing --cpus: unknown option: 4"),
        (
            ["--memory", "size=4g"],
            "Error parsing config: Error parsing --memory: unable to convert 4g for size",
        ),
        (
            ["--memory", "size=4096MiB"],
            "Error parsing config: Error parsing --memory: unable to convert 4096MiB for size",
        ),
        (
            ["--cpus", "boot=4,max=2"],
            "Error parsing config: Error validating configuration: Max CPUs lower than boot CPUs",
        ),
        (
            ["--serial", "bogus"],
            "Error parsing config: Error parsing --console: unknown option: bogus",
        ),
        (["--device", "id=gpu"], "Error parsing config: Error parsing --device: path missing"),
        (
            ["--disk", "path=/a,sise=1"],
            "Error parsing config: Error parsing --disk: unknown option: sise",
        ),
    ],
)
def test_config_errors_exit_1(box: Box, args: list[str], message: str) -> None:
    r = box.run("--api-socket", f"path={box.sock}", "--firmware", str(box.firmware), *args)
    assert r.returncode == 1, r.stderr
    assert message in r.stderr


def test_config_error_leaves_the_api_socket_behind(box: Box) -> None:
    # v42 parses the VM config after its API thread is up and only removes the socket on a
    # clean exit: a launcher must remove a stale socket before every start.
    r = box.run("--api-socket", f"path={box.sock}", "--firmware", str(box.firmware), "--cpus", "4")
    assert r.returncode == 1
    assert stat.S_ISSOCK(box.sock.stat().st_mode)


def test_good_command_line_multiple_values_after_one_flag(box: Box) -> None:
    seed = box.dir / "seed.img"
    seed.write_bytes(b"\0" * 4096)
    # One --disk flag with two values, one --net with two; --opt=value works too.
    proc = box.start(
        "--api-socket",
        f"path={box.sock}",
        "--firmware",
        str(box.firmware),
        "--cpus",
        "boot=2",
        "--memory=size=512M",
        "--console",
        "off",
        "--disk",
        f"path={box.disk}",
        f"path={seed},readonly=on",
        "--net",
        "tap=tap-vm1,mac=52:54:00:12:34:56",
        "tap=tap-vm1b",
        "--seccomp",
        "log",
        "--pvpanic",
    )
    proc.wait_ready(box.sock)
    info = box.api("GET", "vm.info").json()
    config = info["config"]
    assert info["state"] == "Running"
    assert [d["path"] for d in config["disks"]] == [str(box.disk), str(seed)]
    assert [d["readonly"] for d in config["disks"]] == [False, True]
    # Ids come from one counter shared by all device kinds.
    assert [d["id"] for d in config["disks"]] == ["_disk0", "_disk1"]
    assert [n["id"] for n in config["net"]] == ["_net2", "_net3"]
    assert config["net"][0]["mac"] == "52:54:00:12:34:56"
    assert config["memory"]["size"] == 512 << 20
    assert config["cpus"] == {**config["cpus"], "boot_vcpus": 2, "max_vcpus": 2}
    assert config["pvpanic"] is True


# -- start-up failures -------------------------------------------------------------------


def test_no_kvm_fails_before_the_socket_exists(box: Box) -> None:
    (box.sysroot / "dev" / "kvm").unlink()
    r = box.run(*box.vm_args())
    assert r.returncode == 1
    assert NO_KVM in r.stderr
    assert not box.sock.exists()
    assert not box.events.exists()


def test_stale_socket_is_addr_in_use(box: Box) -> None:
    box.sock.write_bytes(b"")
    r = box.run(*box.vm_args())
    assert r.returncode == 1
    assert "Failed to start the VMM thread: Error creation API server's socket" in r.stderr
    assert "kind: AddrInUse" in r.stderr


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        (["--cmdline", "console=ttyS0"], {}, "Error booting VM: VmBoot(InvalidPayload)"),
        (
            ["--disk", "path=/nonexistent/disk.img"],
            {},
            "Error booting VM: VmBoot(DeviceManager(Disk(Os { code: 2, kind: NotFound",
        ),
        ([], {"CH_STANDIN_BOOT_FAIL": "disk exploded"}, "Error booting VM: VmBoot(disk exploded)"),
    ],
)
def test_boot_failures_exit_1(
    box: Box, extra: list[str], env: dict[str, str], message: str
) -> None:
    args = box.vm_args()
    if "--disk" in extra:  # v42 takes --disk once
        args = [a for a in args if a not in ("--disk", f"path={box.disk}")]
    r = box.run(*args, *extra, **env)
    assert r.returncode == 1, r.stderr
    assert message in r.stderr
    assert names(read_events(box.events))[-1] == "vmm/shutdown"


def test_missing_firmware_file(box: Box) -> None:
    box.firmware.unlink()
    r = box.run(*box.vm_args())
    assert r.returncode == 1
    assert "Error booting VM: VmBoot(FirmwareFile(Os { code: 2, kind: NotFound" in r.stderr


# -- the API -----------------------------------------------------------------------------


def test_ping_headers_and_keep_alive(box: Box) -> None:
    proc = box.boot()
    conn = UnixHTTPConnection(str(box.sock))
    try:
        for _ in range(3):  # one connection, several requests
            conn.request("GET", "/api/v1/vmm.ping")
            r = read_reply(conn)
            assert r.status == 200
            assert r.headers["server"] == "Cloud Hypervisor API"
            assert r.headers["content-type"] == "application/json"
            assert r.json() == {
                "build_version": "v42.0",
                "version": "42.0.0",
                "pid": proc.pid,
                "features": ["kvm"],
            }
    finally:
        conn.close()


def test_lifecycle_over_the_socket(box: Box) -> None:
    proc = box.boot()
    info = box.api("GET", "vm.info").json()
    assert info["state"] == "Running"
    assert info["config"]["platform"]["uuid"] == "4b1a6bd0-7c1f-4b7e-9a53-3c54e6d3a0f1"
    assert info["config"]["payload"]["firmware"] == str(box.firmware)
    assert info["config"]["serial"] == {
        "file": str(box.serial),
        "mode": "File",
        "iommu": False,
        "socket": None,
    }
    assert info["config"]["console"]["mode"] == "Off"
    assert info["memory_actual_size"] == 1 << 30

    assert box.api("PUT", "vm.pause").status == 204
    assert box.api("GET", "vm.info").json()["state"] == "Paused"
    again = box.api("PUT", "vm.pause")
    assert again.status == 500
    assert again.headers["content-type"] == "application/json"  # even for plain text
    assert again.text == (
        "Error from API: The VM could not be paused: Cannot pause VM: Failed to pause "
        "migratable component: Invalid transition: InvalidStateTransition(Paused, Paused)"
    )
    assert box.api("PUT", "vm.resume").status == 204
    assert box.api("GET", "vm.info").json()["state"] == "Running"
    assert box.api("PUT", "vm.resume").status == 500

    counters = box.api("GET", "vm.counters").json()
    assert set(counters["_disk0"]) >= {"read_bytes", "write_bytes", "read_ops", "write_ops"}

    # vm.shutdown stops the VM, keeps the config and the process.
    assert box.api("PUT", "vm.shutdown").status == 204
    assert box.api("GET", "vm.info").json()["state"] == "Created"
    assert proc.alive()
    r = box.api("PUT", "vm.pause")
    assert (r.status, r.text) == (
        500,
        "Error from API: The VM could not be paused: VM is not running",
    )
    assert box.api("PUT", "vm.shutdown").text.endswith("VM is not running")
    assert box.api("PUT", "vm.boot").status == 204
    assert box.api("GET", "vm.info").json()["state"] == "Running"
    r = box.api("PUT", "vm.boot")
    assert r.status == 500
    assert "invalid VM state transition: Running to Running" in r.text

    # vmm.shutdown: 200 (not the spec's 204), then a clean exit that removes the socket.
    r = box.api("PUT", "vmm.shutdown")
    assert (r.status, r.body) == (200, b"")
    assert proc.wait() == 0
    assert not box.sock.exists()


def test_http_quirks(box: Box) -> None:
    box.boot()
    r = box.api("GET", "vm.nonsense")
    assert (r.status, r.text) == (404, "Not Found")
    assert box.api("GET", "/api/v2/vmm.ping").status == 404
    assert box.api("GET", "vm.pause").status == 400  # PUT-only action
    assert box.api("PUT", "vm.info").status == 400  # GET-only
    assert box.api("PUT", "vmm.ping").status == 400
    r = box.api("PUT", "vm.pause", body=b"{}")  # bodyless action with a body
    assert (r.status, r.text) == (400, "Bad Request")
    assert box.api("POST", "vm.pause").status == 400
    assert box.api("PUT", "vm.add-device").status == 400  # needs a body
    r = box.api("PUT", "vm.add-device", body=b"{not json")
    assert r.status == 400
    big = box.api("PUT", "vm.add-device", body=b"x" * (51200 + 1))
    assert big.status == 400
    assert "larger than the limit of 51200" in big.text
    # The connection survives: ping on a fresh one still works.
    assert box.api("GET", "vmm.ping").status == 200
    # 204s carry no body and no Content-Length.
    r = box.api("PUT", "vm.nmi")
    assert r.status == 204
    assert "content-length" not in r.headers


def test_empty_vmm_and_vm_create(box: Box) -> None:
    proc = box.start("--api-socket", f"path={box.sock}")
    proc.wait_ready(box.sock)
    r = box.api("GET", "vm.info")
    assert (r.status, r.text) == (
        500,
        "Error from API: The VM info is not available: VM is not created",
    )
    r = box.api("PUT", "vm.boot")
    assert (r.status, r.text) == (
        500,
        "Error from API: The VM could not boot: VM config is missing",
    )
    assert box.api("PUT", "vm.create").status == 400  # no body
    config = {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256 << 20},
        "payload": {"firmware": str(box.firmware)},
        "disks": [{"path": str(box.disk)}],
        "serial": {"mode": "File", "file": str(box.serial)},
        "console": {"mode": "Off"},
    }
    body = json.dumps(config).encode()
    assert box.api("PUT", "vm.create", body=body).status == 204
    r = box.api("PUT", "vm.create", body=body)
    assert (r.status, r.text) == (
        500,
        "Error from API: The VM could not be created: VM is already created",
    )
    assert box.api("GET", "vm.info").json()["state"] == "Created"
    assert box.api("PUT", "vm.boot").status == 204
    assert box.api("GET", "vm.info").json()["state"] == "Running"
    assert "Booting from" in box.serial.read_text()
    assert box.api("PUT", "vm.delete").status == 204
    assert box.api("GET", "vm.info").status == 500
    assert proc.alive()


def test_reboot_rebuilds_the_vm_in_the_same_process(box: Box) -> None:
    proc = box.boot()
    assert box.api("PUT", "vm.reboot").status == 204
    assert box.api("GET", "vm.info").json()["state"] == "Running"
    assert proc.alive()
    got = names(read_events(box.events))
    i = got.index("vm/rebooting")
    assert got[i : i + 5] == [
        "vm/rebooting",
        "vm/shutdown",
        "vm/booting",
        "vm/booted",
        "vm/rebooted",
    ]


def test_guest_reboot_knob(box: Box) -> None:
    proc = box.boot(CH_STANDIN_REBOOT_AFTER="0.1")
    assert wait_until(lambda: "vm/rebooted" in names(read_events(box.events)))
    assert proc.alive()
    assert box.api("GET", "vm.info").json()["state"] == "Running"


# -- power button and signals ------------------------------------------------------------


def test_power_button_powers_off_and_the_process_exits_0(box: Box) -> None:
    proc = box.boot(CH_STANDIN_POWEROFF_DELAY="0.1")
    assert box.api("PUT", "vm.power-button").status == 204
    assert proc.wait() == 0
    assert not box.sock.exists()
    assert "reboot: Power down" in box.serial.read_text()
    assert names(read_events(box.events))[-3:] == ["vm/shutdown", "vm/deleted", "vmm/shutdown"]


def test_power_button_ignored_by_the_guest(box: Box) -> None:
    proc = box.boot(CH_STANDIN_IGNORE_POWER_BUTTON="1", CH_STANDIN_POWEROFF_DELAY="0.05")
    assert box.api("PUT", "vm.power-button").status == 204
    time.sleep(0.5)
    assert proc.alive()
    assert box.api("GET", "vm.info").json()["state"] == "Running"
    # The escalation a launcher uses next.
    assert box.api("PUT", "vm.shutdown").status == 204
    assert box.api("GET", "vm.info").json()["state"] == "Created"
    assert box.api("PUT", "vmm.shutdown").status == 200
    assert proc.wait() == 0


def test_power_button_without_a_running_vm(box: Box) -> None:
    proc = box.start("--api-socket", f"path={box.sock}")
    proc.wait_ready(box.sock)
    r = box.api("PUT", "vm.power-button")
    assert (r.status, r.text) == (
        500,
        "Error from API: Error triggering power button: VM is not running",
    )


def test_power_button_while_paused_waits_for_resume(box: Box) -> None:
    proc = box.boot(CH_STANDIN_POWEROFF_DELAY="0.05")
    assert box.api("PUT", "vm.pause").status == 204
    assert box.api("PUT", "vm.power-button").status == 204
    time.sleep(0.3)
    assert proc.alive()
    assert box.api("PUT", "vm.resume").status == 204
    assert proc.wait() == 0


def test_guest_poweroff_knob(box: Box) -> None:
    proc = box.boot(CH_STANDIN_POWEROFF_AFTER="0.1")
    assert proc.wait() == 0
    assert not box.sock.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_a_graceful_exit(box: Box, signum: int) -> None:
    proc = box.boot()
    os.kill(proc.pid, signum)
    assert proc.wait() == 0
    assert not box.sock.exists()
    assert names(read_events(box.events))[-1] == "vmm/shutdown"


# -- files ---------------------------------------------------------------------------------


def test_serial_log_and_owner_only_files(box: Box) -> None:
    box.boot()
    assert wait_until(lambda: "login:" in box.serial.read_text())
    text = box.serial.read_text()
    assert "CLOUDHV.fd" in text.splitlines()[0]
    assert f"Booting from {box.disk}" in text
    assert re.search(r"\[\s+\d+\.\d{6}\] Linux version", text)
    assert text.rstrip().endswith("smechguest login:")
    # umask 077, as v42 sets it first thing.
    for path in (box.sock, box.serial, box.events, box.log):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_console_tty_writes_to_stdout_and_off_does_not(box: Box) -> None:
    args = [a for a in box.vm_args() if a not in ("--console", "off")]
    on = box.start(*args)
    on.wait_ready(box.sock)
    assert box.api("PUT", "vmm.shutdown").status == 200
    assert on.wait() == 0
    assert "smechguest login:" in on.stdout()
    assert "Booting from" not in on.stdout()  # firmware output goes to the serial port only

    off = box.start(*box.vm_args())
    off.wait_ready(box.sock)
    assert box.api("PUT", "vmm.shutdown").status == 200
    assert off.wait() == 0
    assert off.stdout() == ""


def test_serial_socket(box: Box) -> None:
    serial_sock = box.dir / "serial.sock"
    args = box.vm_args()
    args[args.index("--serial") + 1] = f"socket={serial_sock}"
    proc = box.start(*args)
    proc.wait_ready(box.sock)
    assert stat.S_ISSOCK(serial_sock.stat().st_mode)

    def read_until(s: socket.socket, marker: bytes) -> bytes:
        seen = b""
        while marker not in seen:
            chunk = s.recv(4096)
            assert chunk, f"serial socket closed, got {seen!r}"
            seen += chunk
        return seen

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(str(serial_sock))
        # Boot output went nowhere (no client then); Enter gets a fresh getty prompt.
        s.sendall(b"\r")
        assert read_until(s, b"login: ").endswith(b"smechguest login: ")
        # The serial device is rebuilt with the VM: a reboot drops the client.
        assert box.api("PUT", "vm.reboot").status == 204
        assert wait_until(lambda: s.recv(4096) == b"")
    assert stat.S_ISSOCK(serial_sock.stat().st_mode)
    assert box.api("PUT", "vmm.shutdown").status == 200
    assert proc.wait() == 0
    assert not serial_sock.exists()


def test_serial_pty_survives_a_reboot(box: Box) -> None:
    args = box.vm_args()
    args[args.index("--serial") + 1] = "pty"
    box.start(*args).wait_ready(box.sock)
    pty = box.api("GET", "vm.info").json()["config"]["serial"]
    assert pty["mode"] == "Pty"
    assert pty["file"].startswith("/dev/pts/")
    fd = os.open(pty["file"], os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        assert box.api("PUT", "vm.reboot").status == 204
        seen = b""

        def got_prompt() -> bool:
            nonlocal seen
            with contextlib.suppress(BlockingIOError):
                seen += os.read(fd, 4096)
            return b"smechguest login: " in seen

        assert wait_until(got_prompt), seen
    finally:
        os.close(fd)
    # v42 hands the same pty to the rebuilt VM.
    assert box.api("GET", "vm.info").json()["config"]["serial"]["file"] == pty["file"]


def test_api_socket_forms(box: Box) -> None:
    bare = box.start("--api-socket", str(box.sock))
    bare.wait_ready(box.sock)
    os.kill(bare.pid, signal.SIGTERM)
    assert bare.wait() == 0
    assert not box.sock.exists()

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(box.sock))
    with box.dir.joinpath("stderr.fd").open("wb") as err:
        p = subprocess.Popen(
            [str(BIN), "--api-socket", f"fd={listener.fileno()}"],
            env=box.env(),
            pass_fds=[listener.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    box.procs.append(p)
    listener.close()
    assert wait_until(lambda: _pings(box.sock))
    assert box.api("PUT", "vmm.shutdown").status == 200
    assert p.wait(TIMEOUT) == 0
    # A socket it was handed is not its file to remove.
    assert box.sock.exists()


def _pings(sock: Path) -> bool:
    try:
        return bool(call(str(sock), "GET", "vmm.ping", timeout=1).status == 200)
    except OSError:
        return False


def test_add_and_remove_device(box: Box) -> None:
    gpu = "/sys/bus/pci/devices/0000:01:00.0/"
    box.boot()
    body = json.dumps({"path": gpu, "id": "gpu0"}).encode()
    r = box.api("PUT", "vm.add-device", body=body)
    assert r.status == 500
    assert "VfioCreate" in r.text  # not under the sysroot
    (box.sysroot / gpu.strip("/")).mkdir(parents=True)
    r = box.api("PUT", "vm.add-device", body=body)
    assert r.status == 200
    assert r.json()["id"] == "gpu0"
    assert re.fullmatch(r"0000:00:[0-9a-f]{2}\.0", r.json()["bdf"])
    r = box.api("PUT", "vm.add-device", body=body)
    assert r.text.endswith("Failed to validate config: Identifier gpu0 is not unique")
    again = json.dumps({"path": gpu, "id": "gpu1"}).encode()
    r = box.api("PUT", "vm.add-device", body=again)
    assert r.text.endswith(f"Failed to validate config: Duplicated device path: {gpu}")
    assert box.api("PUT", "vm.remove-device", body=b'{"id": "gpu0"}').status == 204
    r = box.api("PUT", "vm.remove-device", body=b'{"id": "gpu0"}')
    assert r.text.endswith('No device with id "gpu0" to remove')


def test_console_socket_is_rejected(box: Box) -> None:
    args = box.vm_args()
    args[args.index("--console") + 1] = f"socket={box.dir / 'console.sock'}"
    r = box.run(*args)
    assert r.returncode == 1
    assert "NoSocketOptionSupportForConsoleDevice" in r.stderr


def test_event_monitor_stream(box: Box) -> None:
    proc = box.boot()
    box.api("PUT", "vm.pause")
    box.api("PUT", "vm.resume")
    box.api("PUT", "vmm.shutdown")
    assert proc.wait() == 0
    raw = box.events.read_text()
    assert raw.startswith('{\n  "timestamp": {\n')  # serde_json's pretty form
    events = read_events(box.events)
    for e in events:
        assert set(e) == {"timestamp", "source", "event", "properties"}
        assert set(e["timestamp"]) == {"secs", "nanos"}
    assert names(events) == [
        "vmm/starting",
        "vm/booting",
        "vm/booted",
        "vm/pausing",
        "vm/paused",
        "vm/resuming",
        "vm/resumed",
        "vm/shutdown",
        "vm/deleted",
        "vmm/shutdown",
    ]
    activated = [e["properties"] for e in events if e["source"] == "virtio-device"]
    assert activated == [{"id": "_disk0"}]
    stamps = [e["timestamp"]["secs"] * 10**9 + e["timestamp"]["nanos"] for e in events]
    assert stamps == sorted(stamps)


def test_vmm_log_format(box: Box) -> None:
    proc = box.boot()
    box.api("PUT", "vm.pause")
    box.api("PUT", "vmm.shutdown")
    assert proc.wait() == 0
    lines = box.log.read_text().splitlines()
    pattern = re.compile(
        r"cloud-hypervisor: \d+\.\d{6}(s|ms|\u00b5s|ns): <[\w-]+> (ERROR|WARN|INFO|DEBUG|TRACE):"
        r"\S+:\d+ -- .+"
    )
    assert lines
    assert all(pattern.fullmatch(line.rstrip("\r")) for line in lines), lines
    assert any(line.rstrip("\r").endswith("API request event: VmPause") for line in lines)


# -- weight ----------------------------------------------------------------------------------


def test_idle_stand_in_uses_no_cpu(box: Box) -> None:
    proc = box.boot()

    def cpu_ticks() -> int:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = cpu_ticks()
    time.sleep(1.0)
    assert cpu_ticks() - before <= 2  # clock ticks, normally 1/100 s each
