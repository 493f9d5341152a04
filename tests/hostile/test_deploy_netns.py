"""A whole deploy across network namespaces while `evil` attacks the target (issue 11,
defects 1 and 6, end to end).

donor, target and evil sit on one bridge (tests/support/netns.py). The receiver is the real
`spk-visor deploy receive` in the target namespace, installing to a loop device; the donor
is the real `spk-visor deploy send`; evil runs the attacker of tests/support/deploy_target
in its own process: four threads reopening silent sockets, 20 idle sockets, and wrong
codes nonstop. The proof: the deploy succeeds on its first try and the disk boots (GRUB in
the MBR), the receiver did not crash, evil never authenticated and had at most 3 guesses,
the code never changed, and the receiver still answers a donor afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.integration import test_deploy_session as session
from tests.support import netns

# The namespaces, the signed release, loop disks and the receiver process of the deploy
# session tests, shared rather than rebuilt.
seg = session.seg
release = session.release
disks = session.disks
receiver = session.receiver
NAMEPLATE, PORT, REPO, send = session.NAMEPLATE, session.PORT, session.REPO, session.send

ATTACK = """
import json, sys, time
from tests.support.deploy_target import Attacker
host, port, source, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
a = Attacker(port, source=source, host=host)
a.reopen_silent(4)
a.hold_idle(20)
a.guess_nonstop(lambda: sys.argv[5])
print("attacking", flush=True)
time.sleep(seconds)
a.stop()
print(json.dumps({"connects": a.connects, "guesses": len(a.guesses), "outcomes": a.outcomes}))
"""


def test_deploy_succeeds_while_evil_floods_and_guesses(
    seg: netns.Segment, release: dict[str, Any], receiver: Any, disks: Any
) -> None:
    disk = disks("4G")
    r = receiver()
    shown = r.code
    target = seg.address("target")
    evil = seg.address("evil")
    attack = seg.popen(
        "evil",
        [sys.executable, "-c", ATTACK, target, str(PORT), evil, "40", f"{NAMEPLATE}-AAAAA"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=session._env(),
        cwd=REPO,
    )
    try:
        assert attack.stdout is not None
        assert attack.stdout.readline().strip() == b"attacking"
        code, docs, err = send(
            seg, shown, "--bundle", str(release["bundle"]), "--target", target,
            "--disk", disk.serial, "--no-reboot",
        )  # fmt: skip
        out, _ = attack.communicate(timeout=90)
    finally:
        if attack.poll() is None:
            attack.kill()
            attack.wait(timeout=10)
    assert code == 0, (err, docs, r.events[-10:])
    assert docs[0]["report"]["ok"]
    stats = json.loads(out.decode().strip().splitlines()[-1])
    assert stats["guesses"] <= 3 and stats["outcomes"].get("got_in", 0) == 0, stats
    assert stats["connects"] >= 24, stats
    # Nothing crashed, no one got in, nothing lost (the code the operator read still holds).
    assert r.proc.poll() is None, "the receiver died"
    assert not r.named("error"), r.named("error")
    assert {e["from"] for e in r.named("connected")} == {seg.address("donor")}
    assert len([e for e in r.named("wrong_code") if e["from"] == evil]) <= 3
    assert not r.named("code_rotated") and r.code == shown
    assert r.wait(lambda e: e["event"] == "report", 10)["ok"]
    assert disk.head() != bytes(440)  # GRUB's boot.img is in the MBR: the disk boots
    # Still serves: another donor session is answered (a plan refusal: the disk is done).
    code, docs, err = send(
        seg, shown, "--bundle", str(release["bundle"]), "--target", target, "--disk",
        "no-such-serial",
    )  # fmt: skip
    assert code == 3 and "no disk matches --disk" in docs[0]["message"], err
