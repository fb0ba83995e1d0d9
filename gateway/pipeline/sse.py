"""Server-sent events: split an upstream byte stream into whole events, keeping their raw bytes."""

from __future__ import annotations

from collections.abc import Iterator

# the field names SSE defines; a line naming any other is not an event stream (HTML, prose)
SSE_FIELDS = frozenset((b"data", b"event", b"id", b"retry"))


BOM = b"\xef\xbb\xbf"


class SSEDecoder:
    """Feed raw bytes, get (raw_event_bytes, data) per complete event.

    ``data`` is the event's joined ``data:`` payload (bytes), or None for comments and
    events without data. The raw bytes are relayed as they came, with line ends made LF
    (SSE allows CRLF, CR and LF), so nothing is re-encoded. However the bytes are split
    into chunks, the same events come out.
    """

    __slots__ = ("_buf", "_fresh")

    def __init__(self) -> None:
        self._buf = b""
        self._fresh = True  # no byte seen yet: a leading BOM is ignored, as the spec says

    def feed(self, chunk: bytes) -> Iterator[tuple[bytes, bytes | None]]:
        buf = self._buf + chunk if self._buf else chunk
        if self._fresh:
            if len(buf) < len(BOM) and BOM.startswith(buf):
                self._buf = buf  # perhaps a BOM split across chunks: wait for more
                return
            self._fresh = False
            if buf.startswith(BOM):
                buf = buf[len(BOM) :]
        if b"\r" in buf:
            buf = lf_line_ends(buf)
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


def lf_line_ends(buf: bytes) -> bytes:
    """CRLF and lone CR → LF. A CR at the very end is kept as it is: it may be the first
    half of a CRLF whose LF is in the next chunk."""
    if buf.endswith(b"\r"):
        return buf[:-1].replace(b"\r\n", b"\n").replace(b"\r", b"\n") + b"\r"
    return buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def event_data(raw: bytes) -> bytes | None:
    if raw.startswith(b"data: ") and raw.count(b"\n") == 2:  # the common single-line case
        return raw[6:-2]
    lines = [line[5:].removeprefix(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def is_sse(raw: bytes) -> bool:
    """Every line of the event is blank, a comment or a field SSE defines. Called only for
    events without data (keep-alives, `event:` lines): the only place non-SSE bytes hide."""
    for line in raw.split(b"\n"):
        if line and line[:1] != b":" and line.partition(b":")[0] not in SSE_FIELDS:
            return False
    return True


def with_data(raw: bytes, data: bytes) -> bytes:
    """The event `raw` with its data replaced by `data` (one line, JSON has no newline),
    its other fields (`event:`, `id:`) kept in place."""
    if raw.startswith(b"data: ") and raw.count(b"\n") == 2:  # the common single-line case
        return b"data: " + data + b"\n\n"
    lines, placed = [], False
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            if not placed:
                lines.append(b"data: " + data)
                placed = True
        elif line:
            lines.append(line)
    if not placed:
        lines.append(b"data: " + data)
    return b"\n".join(lines) + b"\n\n"
