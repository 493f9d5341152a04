"""JSON from anyone we do not trust: mirrors, bundles, the deploy channel, the LAN.

`json.loads` accepts what a careful parser should not: duplicate keys (the last one wins,
so two parsers can disagree about what was signed), NaN and Infinity (not JSON), and
nesting as deep as the C stack allows (a RecursionError, which no `except ValueError`
catches). `loads` refuses all three with StrictJSONError, a ValueError, so every caller's
existing "not valid JSON" branch handles it.
"""

from __future__ import annotations

import json
from typing import Any

# Our documents nest 5 levels at most (manifest -> components -> tree -> files -> entry);
# a generous bound that still keeps every walk of a parsed document shallow.
MAX_DEPTH = 32


class StrictJSONError(ValueError):
    """Not the strict JSON we accept."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise StrictJSONError(f"duplicate key {key[:64]!r}")
        doc[key] = value
    return doc


def _constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not JSON")


def _check_depth(doc: Any, limit: int) -> None:
    """Iterative, so the check itself cannot overflow."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            raise StrictJSONError(f"nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def loads(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `data`; StrictJSONError (a ValueError) for anything but plain, shallow JSON."""
    try:
        doc = json.loads(data, object_pairs_hook=_pairs, parse_constant=_constant)
    except RecursionError:
        raise StrictJSONError(f"nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as e:  # bytes that are not UTF-8/16/32
        raise StrictJSONError(f"not UTF-8 text: {e.reason}") from None
    _check_depth(doc, max_depth)
    return doc
