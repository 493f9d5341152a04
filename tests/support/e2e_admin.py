"""The admin's workstation in the end-to-end tests: a HOME with an SSH key, and the tools.

`cli()` runs `spk-visor` as its own process with HOME pointing here, so its known_hosts
(`--accept-new` records the node's key) and SSH identity are the admin's, never the
machine's. `ssh()` runs OpenSSH's client with the same key and known_hosts, for what an
admin checks by hand on the node (the kernel command line, a file).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.e2e_release import REPO


@dataclass
class Admin:
    home: Path

    @classmethod
    def create(cls, home: Path) -> Admin:
        ssh = home / ".ssh"
        ssh.mkdir(parents=True, mode=0o700)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin@e2e",
             "-f", str(ssh / "id_ed25519")],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        return cls(home)

    @property
    def public_key(self) -> str:
        return (self.home / ".ssh" / "id_ed25519.pub").read_text()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPK_VISOR_")}
        env.update(
            HOME=str(self.home),
            SPK_VISOR_CONFIG=str(self.home / "no-config.toml"),
            SPK_VISOR_KNOWN_CERTS=str(self.home / "known_certs"),
        )
        env.pop("SSH_AUTH_SOCK", None)  # only the admin's key file, no agent of the host
        return env

    def cli(self, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """`spk-visor ARGV` as the admin runs it."""
        return subprocess.run(
            [sys.executable, "-m", "spk_visor", *argv],
            capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO,
            env=self.env(),
        )  # fmt: skip

    def ssh(
        self, port: int, command: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`ssh root@127.0.0.1 -p PORT COMMAND` with the admin's key and known_hosts."""
        ssh_dir = self.home / ".ssh"
        return subprocess.run(
            [
                "ssh", "-F", "none", "-p", str(port), "-i", str(ssh_dir / "id_ed25519"),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={ssh_dir / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=20",
                "root@127.0.0.1", command,
            ],
            capture_output=True, text=True, timeout=timeout, check=False, env=self.env(),
        )  # fmt: skip
