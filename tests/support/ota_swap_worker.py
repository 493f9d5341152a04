"""A private stand-in for the OTA worker: run one swap step as its own process.

    python -m tests.support.ota_swap_worker run PAYLOAD.json MANIFEST_HEX [--manual-commit]
    python -m tests.support.ota_swap_worker recover|commit|rollback

The node comes from the environment (SPK_VISOR_OTA_SYSROOT, SPK_VISOR_OTA_CONF), as for
the real worker; the manifest payload is read from a file (already "verified": tests build
it themselves). The step runs under the OTA lock. Prints one JSON line with the result, and
exits with its exit code. SPK_VISOR_OTA_CRASH_AT makes it SIGKILL itself at that step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spk_visor.errors import SpkVisorError
from spk_visor.ota import swap
from spk_visor.ota.context import load_context
from spk_visor.ota.journal import locked
from spk_visor.trust import manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ota_swap_worker")
    parser.add_argument("step", choices=("run", "recover", "commit", "rollback"))
    parser.add_argument("payload", nargs="?", type=Path)
    parser.add_argument("manifest_hex", nargs="?")
    parser.add_argument("--manual-commit", action="store_true")
    args = parser.parse_args(argv)
    ctx = load_context(lambda event, fields: print(json.dumps({event: fields}), file=sys.stderr))
    try:
        with locked(ctx.paths, f"ota-swap-worker {args.step}"):
            if args.step == "run":
                parsed = manifest.parse(json.loads(args.payload.read_text()))
                code = int(
                    swap.run(ctx, parsed, args.manifest_hex, manual_commit=args.manual_commit)
                )
                print(json.dumps({"exit_code": code}))
                return code
            if args.step == "recover":
                print(json.dumps({"actions": swap.recover(ctx)}))
                return 0
            code = int(swap.commit(ctx) if args.step == "commit" else swap.rollback(ctx))
            print(json.dumps({"exit_code": code}))
            return code
    except SpkVisorError as e:
        print(json.dumps({"error": e.message, "exit_code": int(e.exit_code)}))
        return int(e.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
