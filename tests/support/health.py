"""One GET of a daemon's /api/health on the loopback, without any proxy the environment sets."""

from __future__ import annotations

import json
import urllib.request
from typing import Any


def health(port: int) -> dict[str, Any] | None:
    """The health document on 127.0.0.1:`port`, or None while nothing answers it."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
            body: dict[str, Any] = json.loads(r.read())
            return body
    except (OSError, ValueError):
        return None
