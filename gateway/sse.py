"""Server-sent events: split an upstream byte stream into whole events, keeping their raw bytes."""

from __future__ import annotations

from collections.abc import Iterator


class SSEDecoder:
    """Feed raw bytes, get (raw_event_bytes, data) per complete event.

    ``data`` is the event's joined ``data:`` payload (bytes), or None for comments and
    events without data. The raw bytes are relayed as they came, so nothing is re-encoded.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> Iterator[tuple[bytes, bytes | None]]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            raw = buf[start : end + 2]
            start = end + 2
            yield raw, event_data(raw)
        self._buf = buf[start:]

    def tail(self) -> bytes:
        """Whatever arrived after the last complete event (a cut-off stream)."""
        return self._buf


def event_data(raw: bytes) -> bytes | None:
    if raw.startswith(b"data: ") and raw.count(b"\n") == 2:  # the common single-line case
        return raw[6:-2]
    lines = [line[5:].removeprefix(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
