"""The detached OTA worker: `python -m spk_visor.ota.worker MANIFEST_HEX --lock-fd N`.

Started by `ota apply`/`ota pull` in its own session. It inherits the OTA lock as an open
file descriptor and keeps it until it exits, so no other OTA command can start while it
swaps the daemon or writes a slot.
"""

from __future__ import annotations

import argparse
import sys

from spk_visor.ota.context import load_context
from spk_visor.ota.engine import run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spk-visor-ota-worker")
    parser.add_argument("manifest")
    parser.add_argument("--lock-fd", type=int, required=True)
    parser.add_argument("--manual-commit", action="store_true")
    parser.add_argument("--no-daemon", action="store_true")
    parser.add_argument("--no-base", action="store_true")
    args = parser.parse_args(argv)
    # The lock fd stays open (and so locked) for the whole life of this process.
    ctx = load_context(lambda event, fields: print(event, fields, file=sys.stderr, flush=True))
    code = run_worker(
        ctx,
        args.manifest,
        args.manual_commit,
        do_daemon=not args.no_daemon,
        do_base=not args.no_base,
    )
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
