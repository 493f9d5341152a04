"""The anchor: a bare ThreadingHTTPServer answering a fixed JSON document, tuned the way
smechvisord is (HTTP/1.1 keep-alive, TCP_NODELAY, backlog 128). Prints its port."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = json.dumps(
    {
        "cpu_model": "AMD Threadripper PRO 9965WX",
        "cpu_cores": 24,
        "cpu_threads": 48,
        "memory_total_mb": 262144,
        "memory_used_mb": 4096,
        "uptime_seconds": 3600,
        "kvm_available": True,
        "hostname": "smech-01",
        "kernel": "6.6.58-0-lts",
        "boot_mode": "uefi",
        "daemon_version": "0.1.0",
    }
).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


if __name__ == "__main__":
    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()
