"""`--direct-io`, the loop-device mode of the install-path benches (bench.ota_slots,
bench.deploy, bench.writer_ab), defined once here.

Off (the default, so earlier figures stay comparable): the bench's loop device is
buffered, and both the anchor's and the subject's writes and read-backs go through the
backing file's page cache on the host. On: the loop device is attached with `losetup
--direct-io=on` (tests/support/loopattach.py, which fails the bench if the kernel left
DIO off), so the anchor's and the subject's I/O reach the disk under the backing file,
as on a real block device. Anchor and subject always share the one device and its mode;
the output's `loop_direct_io` is read back from the device, not taken from the flag.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from tests.support import loopattach

HELP = (
    "Attach the bench's loop device with losetup --direct-io=on (reads and writes reach "
    "the disk, not the backing file's page cache); fails if the kernel refuses. Default: "
    "buffered, as in earlier figures."
)


def add_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--direct-io", action="store_true", help=HELP)


def figures(dev: str) -> dict[str, object]:
    """The mode the loop device `dev` ran in, for the bench's JSON."""
    return {"loop_device": dev, "loop_direct_io": loopattach.dio(dev)}


@contextlib.contextmanager
def refusal_exits() -> Iterator[None]:
    """A bench asked for --direct-io the kernel did not give: exit 2 with the reason (a
    setup to change, not a bench failure), no traceback."""
    try:
        yield
    except loopattach.DirectIoRefused as e:
        print(f"--direct-io: {e}", file=sys.stderr)
        raise SystemExit(2) from None
