"""Limits at the HTTP layer, applied while the bytes arrive, before the app sees a request.

`LimitedHttpToolsProtocol` is uvicorn's httptools protocol with three limits, per worker:
  - a request head (URL + header lines) over `server.max_header_kb` → 431, connection closed.
    httptools buffers a header until it ends, so the bytes are counted per read: at most one
    read (256 KB) past the limit is ever held;
  - a head not finished `server.header_timeout_s` after the connection opened (or after its
    first bytes, on a kept-alive connection) → closed, with a 408 if part of a head came;
  - connections beyond `server.max_connections` → 503 and closed in `connection_made`, so a
    flood costs a file descriptor for an instant, not for as long as the client likes.
`check_json_depth` is the body limit the pipeline applies right after its one parse.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httptools
import orjson

# Imported directly, not through uvicorn's "auto": without httptools this fails at start
# instead of silently serving with h11 and none of these limits.
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.errors import InvalidRequest

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger("tallygate.http")

BACKLOG = 2048  # uvicorn's default listen backlog
FDS_RESERVED = 64  # listening socket, store, logs, telemetry, tokenizer files
WARN_EVERY_S = 60.0


@dataclass
class HttpLimits:
    max_header_bytes: int
    header_timeout_s: float
    max_connections: int
    # prebuilt refusals: nothing is encoded while under attack
    too_large: bytes = field(init=False, repr=False)
    timed_out: bytes = field(init=False, repr=False)
    busy: bytes = field(init=False, repr=False)
    warned_at: float = field(default=-WARN_EVERY_S, init=False, repr=False)

    def __post_init__(self) -> None:
        kb = self.max_header_bytes // 1024
        self.too_large = refusal(
            431,
            "request_header_too_large",
            f"The request's URL and headers are larger than server.max_header_kb ({kb} KB).",
        )
        self.timed_out = refusal(
            408,
            "request_timeout",
            f"The request's headers did not arrive within server.header_timeout_s"
            f" ({self.header_timeout_s:g} s).",
        )
        self.busy = refusal(
            503,
            "too_many_connections",
            "The gateway is serving as many connections as it allows; retry shortly.",
            b"retry-after: 1\r\n",
            type="service_unavailable",
        )

    def warn_full(self) -> None:
        """Say the connection cap refuses clients, at most once a minute per worker."""
        now = time.monotonic()
        if now - self.warned_at >= WARN_EVERY_S:
            self.warned_at = now
            log.warning(
                "refusing connections: %d open (server.max_connections)", self.max_connections
            )


def refusal(
    status: int,
    code: str,
    message: str,
    extra_headers: bytes = b"",
    *,
    type: str = "invalid_request_error",
) -> bytes:
    """A complete response in OpenAI's error shape that closes the connection."""
    body = orjson.dumps({"error": {"message": message, "type": type, "param": None, "code": code}})
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            extra_headers,
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head that was refused."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.head_open = False  # between on_message_begin and on_headers_complete
        self.head_seen = 0  # bytes of the open head in reads after the one it began in
        self.head_timer: asyncio.TimerHandle | None = None
        self.refused = False
        self.measure_head = True
        # Set by the app while a request waits on its upstream (gateway.pipeline.handle): called
        # when the connection drops, so no task or timer per request watches for that.
        self.on_disconnect: Callable[[], object] | None = None

    @classmethod
    def factory(cls, limits: HttpLimits) -> functools.partial[LimitedHttpToolsProtocol]:
        """What uvicorn.Config(http=...) takes; picklable, so spawned workers get the limits."""
        return functools.partial(cls, limits=limits)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self.limits.warn_full()
            self.refuse(self.limits.busy)
            return
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.limits.header_timeout_s, self.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_head_timer()
        left, self.on_disconnect = self.on_disconnect, None
        super().connection_lost(exc)
        if left is not None:
            left()

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, except that a head refused by a callback gets our answer
        # (not a second, 400 one) and an open head is measured after each read.
        if self.refused:
            return
        was_open = self.head_open
        # A head that begins and ends within one read no longer than the limit fits it:
        # on_headers_complete then need not measure it.
        self.measure_head = was_open or len(data) > self.limits.max_header_bytes
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self.refused:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self.head_open:
            self.head_read(len(data) if was_open else 0)

    def head_read(self, size: int) -> None:
        """A read ended inside a head. A read the head began in may also hold the end of the
        previous request, so only the later ones count: all of their bytes are head."""
        self.head_seen += size
        if self.head_seen > self.limits.max_header_bytes:
            self.refuse(self.limits.too_large)
        elif self.head_timer is None:
            self.head_timer = self.loop.call_later(self.limits.header_timeout_s, self.head_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_open = True
        self.head_seen = 0

    def on_headers_complete(self) -> None:
        self.head_open = False
        self.cancel_head_timer()
        if self.measure_head and self.head_size() > self.limits.max_header_bytes:
            self.refuse(self.limits.too_large)
            raise HeadRefused
        super().on_headers_complete()

    def head_size(self) -> int:
        """The URL and the header lines (name, ": ", value, CRLF), as sent."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def head_timeout(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a response is on its way: finish it, then close
            return
        self.refuse(self.limits.timed_out if self.head_open else b"")

    def cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def refuse(self, response: bytes) -> None:
        self.refused = True
        self.cancel_head_timer()
        if response:
            self.transport.write(response)
        self.transport.close()


def serving_protocol(receive: object) -> LimitedHttpToolsProtocol | None:
    """The connection of the request `receive` belongs to, when tallygate's protocol serves
    it (uvicorn's receive is a method of the request's cycle, whose on_response is a method
    of the connection's protocol); None under any other server."""
    cycle = getattr(receive, "__self__", None)
    protocol = getattr(getattr(cycle, "on_response", None), "__self__", None)
    return protocol if isinstance(protocol, LimitedHttpToolsProtocol) else None


def http_limits(config: Config) -> tuple[HttpLimits, int]:
    """The limits for one worker, and the listen backlog. Queued connections cost no file
    descriptor, but a worker accepts them in batches (gateway/server/listener.py) before refusing
    the excess: it may briefly hold max_connections + backlog sockets, so both must fit the
    fd limit.
    A shorter backlog would not help: a full queue drops handshakes, and clients then wait
    seconds for a retransmit instead of getting an immediate 503."""
    server = config.server
    # every in-flight request may hold one upstream connection besides its own
    upstream = sum(p.max_connections for p in config.providers.values() if p.kind != "mock")
    connections = fit_to_fd_limit(server.max_connections, BACKLOG + upstream + FDS_RESERVED)
    limits = HttpLimits(
        max_header_bytes=server.max_header_kb * 1024,
        header_timeout_s=server.header_timeout_s,
        max_connections=connections,
    )
    return limits, BACKLOG


def fit_to_fd_limit(connections: int, reserved: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards `connections + reserved` (up to the hard limit);
    if it cannot go that high, allow fewer connections, so the process never runs out of
    descriptors for the ones it serves."""
    need = connections + reserved
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return connections
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    fits = max(1, min(connections, soft - reserved))
    if fits < connections:
        log.warning(
            "server.max_connections lowered from %d to %d: the open-file limit is %d"
            " and %d descriptors are kept for upstream connections and files",
            connections,
            fits,
            soft,
            reserved,
        )
    return fits


def check_json_depth(body: object, limit: int) -> None:
    """InvalidRequest if containers nest deeper than `limit` (a top-level object is depth 1).
    Level by level, without recursion, stopping at the first level past the limit."""
    level = [body] if type(body) is dict or type(body) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise InvalidRequest(
                f"The request body is nested deeper than server.max_json_depth ({limit}) allows."
            )
        deeper = []
        for node in level:
            children = node.values() if type(node) is dict else node
            for child in children:
                kind = type(child)
                if kind is dict or kind is list:
                    deeper.append(child)
        level = deeper
