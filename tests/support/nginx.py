"""nginx serving a pull repository on 127.0.0.1, configured with the server block that
docs/ota-origin.md gives users (docs/nginx-ota-origin.conf), only `listen` and `root`
changed (and TLS left out). Every request lands in an access log that the tests and
bench/fleet.py read: request line, Range header, status and bytes sent on the wire."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_BLOCK = ROOT / "docs" / "nginx-ota-origin.conf"
LOG_RE = re.compile(
    r"^(?P<msec>[\d.]+) (?P<method>\S+) (?P<path>\S+) (?P<status>\d+) (?P<sent>\d+)"
    r' "(?P<range>[^"]*)"$'
)


@dataclass(frozen=True)
class Hit:
    method: str
    path: str
    status: int
    sent: int  # bytes on the wire: headers and body
    range: str  # the request's Range header, "-" when none
    at: float = 0.0  # when the request ended (epoch seconds, ms resolution)


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if not found:
        pytest.skip("nginx is not installed (Debian package nginx-light; make sysdeps)")
    return found


def server_block(repo: Path, port: int, *, extra: str = "", blob_rate: str | None = None) -> str:
    text = SERVER_BLOCK.read_text()
    if blob_rate:
        # Only tests slow the blobs down, to have time to cut a download.
        text = text.replace(
            "location ^~ /v1/blobs/ {",
            f"location ^~ /v1/blobs/ {{\n        limit_rate {blob_rate};",
            1,
        )
    text = re.sub(r"^\s*listen .*;$", f"    listen 127.0.0.1:{port};", text, count=1, flags=re.M)
    text = re.sub(r"^\s*server_name .*;$", "    server_name localhost;", text, count=1, flags=re.M)
    return re.sub(r"^\s*root .*;$", f"    root {repo};\n{extra}", text, count=1, flags=re.M)


class Nginx:
    def __init__(
        self, repo: Path, workdir: Path, *, extra: str = "", blob_rate: str | None = None
    ) -> None:
        self.repo = repo
        self.blob_rate = blob_rate
        self.workdir = workdir
        self.extra = extra
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "access.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Nginx:
        binary = nginx_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        w = self.workdir
        # As root, nginx's workers would switch to nobody, who cannot read a test's 0700
        # temporary folder: keep them as the user who started it.
        user = "user root;" if os.geteuid() == 0 else ""
        conf = w / "nginx.conf"
        conf.write_text(
            f"""{user}
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    log_format spk '$msec $request_method $request_uri $status $bytes_sent "$http_range"';
    access_log {self.log} spk;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
{server_block(self.repo, self.port, extra=self.extra, blob_rate=self.blob_rate)}
}}
"""
        )
        check = subprocess.run(
            [binary, "-t", "-c", str(conf), "-p", str(w)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused the config: {check.stderr}")
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(w)], stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited at start: {err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError("nginx did not start listening within 15 s")

    def hits(self) -> list[Hit]:
        """Every request served so far, in order (nginx writes a line as each ends)."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            m = LOG_RE.match(line)
            if m:
                out.append(
                    Hit(
                        m["method"],
                        m["path"],
                        int(m["status"]),
                        int(m["sent"]),
                        m["range"],
                        float(m["msec"]),
                    )
                )
        return out

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish the log lines
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
