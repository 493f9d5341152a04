"""Run the real smechvisord as a subprocess on port 0, against a fixture sysroot and the
cloud-hypervisor stand-in, and talk to it over HTTP."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import sysroots

SUPPORT = Path(__file__).resolve().parent
STANDIN = SUPPORT / "bin" / "cloud-hypervisor"
RECORDER = SUPPORT / "bin" / "record-command"
LISTEN_RE = re.compile(r"listening on http://([^:]+):(\d+)")
FINGERPRINT_RE = re.compile(r"SHA-256 fingerprint ([0-9A-F:]{95})")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def error_code(self) -> str:
        return str(self.json["error"]["code"])


@dataclass
class DaemonEnv:
    """The files one daemon instance uses; survives restarts of the process."""

    root: Path
    kind: str = "intel-ready"
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sysroot = sysroots.build(self.kind, self.root / "sysroot")
        self.state_dir = self.root / "state"
        self.images = self.root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        # AF_UNIX socket paths are limited to 108 bytes; pytest's tmp paths are long.
        self.run_dir = Path(tempfile.mkdtemp(prefix="sv", dir="/tmp"))
        self.token_file = self.root / "etc" / "token"
        self.tls_cert = self.root / "etc" / "tls.crt"
        self.tls_key = self.root / "etc" / "tls.key"
        self.firmware = self.root / "CLOUDHV.fd"
        self.firmware.write_bytes(b"\0" * 4096)
        self.record_file = self.root / "commands.jsonl"
        self.disk = self.make_image("disk.img")

    def make_image(self, name: str, size: int = 1 << 20) -> Path:
        path = self.images / name
        with path.open("wb") as f:
            f.truncate(size)
        return path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMECHVISORD_")}
        env.update(
            {
                "SMECHVISORD_BIND": "127.0.0.1:0",
                "SMECHVISORD_STATE_DIR": str(self.state_dir),
                "SMECHVISORD_RUN_DIR": str(self.run_dir),
                "SMECHVISORD_TOKEN_FILE": str(self.token_file),
                "SMECHVISORD_TLS_CERT": str(self.tls_cert),
                "SMECHVISORD_TLS_KEY": str(self.tls_key),
                "SMECHVISORD_SYSROOT": str(self.sysroot),
                "SMECHVISORD_CH_BIN": str(STANDIN),
                "SMECHVISORD_FIRMWARE": str(self.firmware),
                "SMECHVISORD_IMAGE_DIRS": str(self.images),
                "SMECHVISORD_MODPROBE": str(RECORDER),
                "SMECHVISORD_REBOOT_CMD": f"{RECORDER} reboot",
                "SMECHVISORD_WEB_DIR": str(self.root / "no-web-dir"),
                "CH_STANDIN_SYSROOT": str(self.sysroot),
                "RECORD_FILE": str(self.record_file),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def recorded(self) -> list[list[str]]:
        if not self.record_file.exists():
            return []
        return [json.loads(line)["argv"] for line in self.record_file.read_text().splitlines()]

    def cleanup(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)


class Daemon:
    """One smechvisord process."""

    def __init__(
        self, env: DaemonEnv, args: list[str] | None = None, prefix: list[str] | None = None
    ) -> None:
        """`prefix` runs the daemon under another command (e.g. `ip netns exec NS`)."""
        self.env = env
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "smechvisord", *(args or [])],
            env=env.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._port: int | None = None
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        with self._seen:
            self._seen.wait_for(
                lambda: self._port is not None or self.proc.poll() is not None, timeout=20
            )
        if self._port is None:
            self.stop()
            raise RuntimeError("smechvisord did not start:\n" + "\n".join(self.lines))
        self.token: str = env.token_file.read_text().strip()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                m = LISTEN_RE.search(line)
                if m and self._port is None:
                    self._port = int(m.group(2))
                self._seen.notify_all()

    @property
    def port(self) -> int:
        assert self._port is not None
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def fingerprint(self) -> str:
        """The certificate fingerprint the daemon logged at start."""
        for line in self.lines:
            m = FINGERPRINT_RE.search(line)
            if m:
                return m.group(1)
        raise AssertionError("no fingerprint line in the daemon's log:\n" + "\n".join(self.lines))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> Reply:
        """`token=""` sends the daemon's token, `None` sends none."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = dict(headers or {})
        if token is not None:
            hdrs.setdefault("Authorization", f"Bearer {token or self.token}")
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=5)
        # The process is gone, but its last lines may still sit in the pipe: let the
        # reader take them, so tests can read the daemon's final words.
        self._reader.join(timeout=5)
        return code


def wait_for(predicate: Any, timeout: float = 10, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; bounded, returns the last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def kill_vmms(run_dir: Path) -> None:
    """Stop every stand-in VMM whose API socket lives in this test's run dir, by PID."""
    needle = f"path={run_dir}/"
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.decode(errors="replace").startswith(needle) for a in argv):
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass
