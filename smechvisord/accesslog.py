"""One line per request on stderr: client, method, path, status, milliseconds.

Not the logging module: building a LogRecord and formatting its time cost more than the
rest of a GET /api/health. The line keeps the daemon log's format so the two interleave.
Paths only: query strings can hold things people paste; headers (the token) never appear.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class AccessLog:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._second = -1
        self._stamp = ""

    def write(self, client: str, method: str, path: str, status: int, ms: float) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            # Formatting the date is the costly part; it changes once a second.
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            self._second = second
        millis = int(now * 1000) % 1000
        line = (
            f"{self._stamp},{millis:03d} smechvisord INFO smechvisord.access: "
            f"{client} {method} {path} {status} {ms:.1f}ms\n"
        )
        stream = self._stream or sys.stderr
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed or full log must not fail the request
