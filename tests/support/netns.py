"""A private L2 segment made of network namespaces (design/deploy.md, "Testing it all").

    <prefix>-lan      holds the bridge `br0`; nothing else
    <prefix>-donor    veth `eth0` 10.<n>.0.1/24, the other end on the bridge
    <prefix>-target   veth `eth0` 10.<n>.0.2/24
    <prefix>-target2  veth `eth0` 10.<n>.0.3/24 (only when asked for: parallel deploys)
    <prefix>-evil     veth `eth0` 10.<n>.0.66/24 (the attacker)

Names carry a random prefix so concurrent test runs never share a namespace, and the
second octet is random too so two segments never look alike in a packet capture. Nothing
touches the root namespace's interfaces: the veth pairs are created inside the lan
namespace and one end is moved into each host namespace. `cleanup` deletes every
namespace it made, which also destroys their veths and the bridge.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

HOSTS = {"donor": 1, "target": 2, "target2": 3, "evil": 66}


def _ip() -> str:
    path = shutil.which("ip")
    if path is None:
        raise RuntimeError("ip (iproute2) not found")
    return path


@dataclass
class Segment:
    prefix: str
    subnet: int  # the second octet of 10.<subnet>.0.0/24
    created: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        return f"10.{self.subnet}.0.{HOSTS[host]}"

    @property
    def broadcast(self) -> str:
        return f"10.{self.subnet}.0.255"

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the host's namespace."""
        return [_ip(), "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: Sequence[str], timeout: float = 20) -> str:
        done = subprocess.run(
            self.argv(host, argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv} in {host} failed: {done.stderr.strip()}")
        return done.stdout

    def popen(self, host: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(host, argv), **kwargs)  # type: ignore[call-overload, no-any-return]

    def cleanup(self) -> None:
        for name in reversed(self.created):
            subprocess.run(
                [_ip(), "netns", "del", name], capture_output=True, timeout=20, check=False
            )
        self.created.clear()


def _ip_run(*argv: str) -> None:
    done = subprocess.run([_ip(), *argv], capture_output=True, text=True, timeout=20, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {done.stderr.strip()}")


def create(hosts: Sequence[str] = ("donor", "target", "evil")) -> Segment:
    """Build the segment; on any failure, what was made is removed again."""
    segment = Segment(
        prefix=f"spk{os.getpid() % 10000}{secrets.token_hex(2)}", subnet=16 + secrets.randbelow(200)
    )
    try:
        lan = segment.ns("lan")
        _ip_run("netns", "add", lan)
        segment.created.append(lan)
        _ip_run("-n", lan, "link", "set", "lo", "up")
        _ip_run("-n", lan, "link", "add", "br0", "type", "bridge")
        # No STP forwarding delay: the ports forward as soon as they are up.
        _ip_run("-n", lan, "link", "set", "br0", "type", "bridge", "forward_delay", "0")
        _ip_run("-n", lan, "link", "set", "br0", "up")
        for host in hosts:
            name = segment.ns(host)
            _ip_run("netns", "add", name)
            segment.created.append(name)
            _ip_run("-n", name, "link", "set", "lo", "up")
            port = f"p-{host}"
            _ip_run(
                "-n",
                lan,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                name,
            )
            _ip_run("-n", lan, "link", "set", port, "master", "br0")
            _ip_run("-n", lan, "link", "set", port, "up")
            _ip_run(
                "-n",
                name,
                "addr",
                "add",
                f"{segment.address(host)}/24",
                "broadcast",
                segment.broadcast,
                "dev",
                "eth0",
            )
            _ip_run("-n", name, "link", "set", "eth0", "up")
    except BaseException:
        segment.cleanup()
        raise
    return segment
