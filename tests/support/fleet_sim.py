"""Many simulated node daemons in one process: an asyncio server on N loopback ports that
answers `/api/health` and `/api/node` the way smechvisord does (bearer token checked, JSON
document with the keys the CLI shows), so a fleet of a thousand costs one process.

Some ports can be black holes: they accept the connection and never answer, like a node
whose daemon hangs. Run it as a program to get the ports on stdout:

    python -m tests.support.fleet_sim --nodes 1000 --black-holes 50 --config FILE

It writes a config.toml naming every node (group `big`) to FILE, prints `ready` on stdout
and serves until stdin closes or it gets SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import signal
import sys
from pathlib import Path

TOKEN = "f" * 32


def node_doc(index: int) -> dict[str, object]:
    return {
        "hostname": f"sim-{index:04d}",
        "cpu_model": "Simulated CPU",
        "cpu_cores": 8,
        "cpu_threads": 16,
        "memory_total_mb": 65536,
        "memory_used_mb": 1024 + index,
        "uptime_seconds": 3600 + index,
        "kvm_available": True,
        "kernel": "6.1.0-sim",
        "load_average": [0.1, 0.2, 0.3],
        "vms_running": index % 4,
        "version": "0.0.0-sim",
    }


def _response(status: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Fleet:
    def __init__(self, nodes: int, black_holes: int) -> None:
        self.nodes = nodes
        self.black_holes = set(range(nodes - black_holes, nodes))
        self.servers: list[asyncio.Server] = []
        self.ports: list[int] = []
        self.requests = 0
        self._held: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        for index in range(self.nodes):
            server = await asyncio.start_server(
                functools.partial(self._serve, index), "127.0.0.1", 0, backlog=64
            )
            self.servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    async def _serve(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if index in self.black_holes:
            self._held.append(writer)  # accepted, never answered
            return
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                request_line, *lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines if ln)
                }
                path = request_line.split(" ")[1] if " " in request_line else ""
                if path == "/api/health":
                    body = json.dumps({"status": "ok", "version": "0.0.0-sim"}).encode()
                    writer.write(_response("200 OK", body))
                elif headers.get("authorization") != f"Bearer {TOKEN}":
                    writer.write(
                        _response(
                            "401 Unauthorized",
                            b'{"error": {"code": "unauthorized", "message": "no token"}}',
                        )
                    )
                elif path == "/api/node":
                    writer.write(_response("200 OK", json.dumps(node_doc(index)).encode()))
                else:
                    writer.write(
                        _response(
                            "404 Not Found",
                            b'{"error": {"code": "not_found", "message": "no route"}}',
                        )
                    )
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def config_toml(self) -> str:
        lines = [
            f'[nodes.n{i:04d}]\nurl = "http://127.0.0.1:{port}"\n'
            for i, port in enumerate(self.ports)
        ]
        names = ", ".join(f'"n{i:04d}"' for i in range(self.nodes))
        return "".join(lines) + f'\n[groups]\nbig = [{names}]\none = ["n0000"]\n'

    def close(self) -> None:
        for writer in self._held:
            writer.close()
        for server in self.servers:
            server.close()


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def _main(args: argparse.Namespace) -> None:
    _raise_fd_limit(args.nodes * 3 + 256)
    fleet = Fleet(args.nodes, args.black_holes)
    await fleet.start()
    Path(args.config).write_text(fleet.config_toml())
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    # Stdin closing (the parent died or is done) ends the simulation too.
    loop.add_reader(sys.stdin.fileno(), lambda: None if os.read(0, 1) else done.set())
    await done.wait()
    print(f"requests {fleet.requests}", flush=True)
    fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--black-holes", type=int, default=0)
    parser.add_argument("--config", required=True)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
