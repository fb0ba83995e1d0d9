"""ISO-8601 UTC timestamps, one format for every place that writes one: the access log
(with milliseconds), the spend report and budget messages (to the second)."""

from __future__ import annotations

import functools
from datetime import UTC, datetime


def iso_utc(unix_s: float, *, ms: bool = False) -> str:
    """`2025-06-01T12:00:00Z`; with `ms`, `2025-06-01T12:00:00.123Z` (truncated)."""
    whole = int(unix_s)
    if not ms:
        return f"{_iso_second(whole)}Z"
    return f"{_iso_second(whole)}.{int((unix_s - whole) * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(whole: int) -> str:
    # one formatting per second, however many access lines share it
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
