"""`ota push` to a rack of ten nodes at --parallel 5, against a push to one node, in the
same run: ten real sshd instances on 127.0.0.1, each node's `spk-visor` the stand-in
tests/support/bin/fake-ota-node (reads and hashes the whole bundle as it arrives, through
a 1 MiB pipe as the real one does, then takes --apply-delay seconds as a node's swap and
health checks would).

    .venv/bin/python -m bench.ota_push_rack [--mib 64] [--apply-delay 2] [--runs 3]

Goal (issue 14): ten nodes <= 2.5x the wall time of one. The canary applies alone and the
other nine apply at most five at a time, but they are sent the bundle (all but its last
byte) while the canary applies: the floor is one node's time plus two applies, printed
as "shape floor" below; what the figure shows beyond it is the cost of the fan-out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import figures
from spk_visor.config import SshSpec
from spk_visor.ota.push import PushTarget, push
from spk_visor.transport import ssh
from tests.support import fake_bundle
from tests.support.sshd import Sshd, start_sshd

FAKE_NODE = Path(__file__).resolve().parents[1] / "tests" / "support" / "bin" / "fake-ota-node"
RACK = 10
PARALLEL = 5
GOAL = 2.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--apply-delay", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    figures.print_load("before")
    servers: list[Sshd] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        os.environ["HOME"] = str(base / "home")
        os.environ.pop("SSH_AUTH_SOCK", None)
        try:
            for _ in range(RACK):
                servers.append(start_sshd())
            (base / "home" / ".ssh").mkdir(parents=True, mode=0o700)
            (base / "home" / ".ssh" / "config").write_text(
                "".join(
                    f"Host rack{i}\n    HostName 127.0.0.1\n    Port {s.port}\n"
                    f"    User root\n    IdentityFile {s.user_key}\n"
                    for i, s in enumerate(servers)
                )
            )
            (base / "home" / ".ssh" / "known_hosts").write_text(
                "".join(f"{s.known_hosts_name} {s.host_pub}\n" for s in servers)
            )
            root = base / "nodes"
            for s in servers:
                (root / str(s.port)).mkdir(parents=True)
                (root / str(s.port) / "node.json").write_text(
                    json.dumps({"apply_delay": args.apply_delay})
                )
            bundle = base / "b.spkb"
            fake_bundle.write(bundle, args.mib << 20)
            targets = [PushTarget(f"rack{i}", SshSpec(f"rack{i}")) for i in range(RACK)]

            def run(group: list[PushTarget]) -> float:
                ssh.close_all()  # each push logs in afresh, as a new CLI process would
                t0 = time.perf_counter()
                results = push(
                    bundle,
                    group,
                    remote_command=(sys.executable, str(FAKE_NODE), "--root", str(root)),
                    timeout=120,
                    accept_new=False,
                    parallel=PARALLEL,
                )
                elapsed = time.perf_counter() - t0
                bad = [r for r in results if r.exit_code != 0]
                if bad:
                    raise SystemExit(f"push failed: {[r.to_doc() for r in bad]}")
                return elapsed

            one, rack = figures.alternate(args.runs, lambda: run(targets[:1]), lambda: run(targets))
        finally:
            ssh.close_all()
            for s in servers:
                s.stop()
    speed = figures.ratio(one, rack, "push to ten nodes")
    times = 1 / speed
    print(f"bundle {args.mib} MiB, node-side apply {args.apply_delay:g} s, --parallel {PARALLEL}")
    print(f"one node   {statistics.median(one):7.2f} s  (runs {[round(x, 2) for x in one]})")
    print(f"ten nodes  {statistics.median(rack):7.2f} s  (runs {[round(x, 2) for x in rack]})")
    floor = (statistics.median(one) + 2 * args.apply_delay) / statistics.median(one)
    print(
        f"ten nodes = {times:.2f}x one node (goal <= {GOAL:g}x: "
        f"{'met' if times <= GOAL else 'missed'}; shape floor: one node + two applies "
        f"= {floor:.2f}x)"
    )
    figures.print_load("after")


if __name__ == "__main__":
    main()
