"""JSON from anyone we do not trust (mirrors, bundles, the deploy channel, the LAN), read
with the daemon's strict parser: duplicate keys, NaN, Infinity, out-of-range numbers and
deep nesting are refused with a ValueError, so every caller's existing "not valid JSON"
branch handles them. One parser for both sides (spk_visor may import smechvisord; never
the reverse); only the depth differs.
"""

from __future__ import annotations

from typing import Any

from smechvisord import strict_json as _strict
from smechvisord.strict_json import StrictJsonError

# Our documents nest 5 levels at most (manifest -> components -> tree -> files -> entry);
# a generous bound that still keeps every walk of a parsed document shallow.
MAX_DEPTH = 32

StrictJSONError = StrictJsonError

__all__ = ["MAX_DEPTH", "StrictJSONError", "loads"]


def loads(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `data`; StrictJSONError (a ValueError) for anything but plain, shallow JSON."""
    return _strict.loads(bytes(data) if isinstance(data, bytearray) else data, max_depth)
