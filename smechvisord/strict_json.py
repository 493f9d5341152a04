"""JSON from outside the daemon (request bodies, record files), read strictly.

Python's json module lets the last of two equal keys win (`{"enable": false, "enable":
true}` turned VFIO on), reads NaN, Infinity and 1e999 as floats no JSON peer can write
back, and nests as deep as the C stack allows. A proxy or a validator in front that reads
the same text differently would see another document: refuse all of them.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 8


class StrictJsonError(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise StrictJsonError(f"duplicate key {key!r}")
        doc[key] = value
    return doc


def _constant(name: str) -> Any:
    raise StrictJsonError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJsonError(f"{text} is out of range")
    return value


def loads(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """The document, or StrictJsonError (a ValueError) saying what is wrong with it."""
    try:
        doc = json.loads(
            raw, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float
        )
    except RecursionError:
        raise StrictJsonError("nested too deeply") from None
    except StrictJsonError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise StrictJsonError(str(e)) from None
    if _depth(doc) > max_depth:
        raise StrictJsonError(f"nested deeper than {max_depth} levels")
    return doc


def _depth(doc: Any) -> int:
    """Nesting depth without recursion: 0 for a scalar, 1 for a flat object or list."""
    deepest = 0
    stack = [(doc, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest
