"""A mock OpenAI upstream fast enough never to be the bottleneck: raw asyncio + httptools.

It answers POST /v1/chat/completions (any path ending in /chat/completions) with a fixed
chat.completion, or, when the body asks for ``"stream": true``, a chunked SSE stream of
``--chunks`` chunks ``--chunk-delay-ms`` apart (timers on the loop, never a sleep), a usage
chunk when the body mentions ``include_usage``, then ``data: [DONE]``. POST /v1/messages
answers a fixed Anthropic Message (non-stream only; at once, like the chat answer, and of
about its size; a streaming request gets a 400), so bench.messages can measure the
gateway's native Anthropic pass-through beside chat. GET /v1/models lists one model;
anything else is a 404. HTTP/1.1 keep-alive, no pipelining beyond queueing.

The HTTP plumbing (``HttpProtocol`` + ``serve``) is reused by bench.run's OTLP receiver.

    python -m bench.mock_upstream --port 9001 [--chunks 20 --chunk-delay-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from typing import Protocol

import httptools

MODEL = "gpt-4o-mini"
CREATED = 1_700_000_000
COMPLETION_ID = "chatcmpl-bench0000000000000000000000"
USAGE = b'{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}'

COMPLETION_BODY = (
    b'{"id":"'
    + COMPLETION_ID.encode()
    + b'","object":"chat.completion","created":'
    + str(CREATED).encode()
    + b',"model":"'
    + MODEL.encode()
    + b'",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":'
    b'"Hello! How can I help you today?","refusal":null},"logprobs":null,'
    b'"finish_reason":"stop"}],"usage":' + USAGE + b',"system_fingerprint":"fp_bench"}'
)
MODELS_BODY = (
    b'{"object":"list","data":[{"id":"' + MODEL.encode() + b'","object":"model",'
    b'"created":' + str(CREATED).encode() + b',"owned_by":"bench"}]}'
)
# Anthropic's Messages API: the chat completion's reply and usage in Anthropic's shape
ANTHROPIC_MODEL = "claude-haiku-4-5"
MESSAGE_ID = "msg_bench000000000000000000"
MESSAGE_BODY = (
    b'{"id":"' + MESSAGE_ID.encode() + b'","type":"message","role":"assistant","model":"'
    + ANTHROPIC_MODEL.encode() + b'","content":[{"type":"text","text":'
    b'"Hello! How can I help you today?"}],"stop_reason":"end_turn","stop_sequence":null,'
    b'"usage":{"input_tokens":12,"cache_creation_input_tokens":0,'
    b'"cache_read_input_tokens":0,"output_tokens":9}}'
)  # fmt: skip
MESSAGE_STREAM_BODY = (
    b'{"type":"error","error":{"type":"invalid_request_error",'
    b'"message":"the bench mock does not stream messages"}}'
)
NOT_FOUND_BODY = (
    b'{"error":{"message":"not found","type":"invalid_request_error","param":null,'
    b'"code":"not_found"}}'
)


def response_bytes(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    """One complete HTTP/1.1 response, keep-alive, with Content-Length."""
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}.get(status, b"OK")
    return (
        b"HTTP/1.1 " + str(status).encode() + b" " + reason + b"\r\n"
        b"content-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"\r\n" + body
    )


COMPLETION_RESPONSE = response_bytes(200, COMPLETION_BODY)
MODELS_RESPONSE = response_bytes(200, MODELS_BODY)
NOT_FOUND_RESPONSE = response_bytes(404, NOT_FOUND_BODY)
MESSAGE_RESPONSE = response_bytes(200, MESSAGE_BODY)
MESSAGE_STREAM_RESPONSE = response_bytes(400, MESSAGE_STREAM_BODY)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)
WORDS = [b"Hello", b" there", b"!", b" How", b" can", b" I", b" help", b" you", b" today", b"?"]


def _chunked(payload: bytes) -> bytes:
    """Wrap one SSE event in one HTTP chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(data: bytes) -> bytes:
    return _chunked(b"data: " + data + b"\n\n")


def _chunk_event(delta: bytes, finish: bytes = b"null") -> bytes:
    return _sse(
        b'{"id":"'
        + COMPLETION_ID.encode()
        + b'","object":"chat.completion.chunk","created":'
        + str(CREATED).encode()
        + b',"model":"'
        + MODEL.encode()
        + b'",'
        b'"system_fingerprint":"fp_bench","choices":[{"index":0,"delta":'
        + delta
        + b',"logprobs":null,"finish_reason":'
        + finish
        + b"}]}"
    )


def stream_events(n_chunks: int, usage: bool) -> list[bytes]:
    """The pre-encoded chunks of one stream: first (role + word), words, last, tail.

    The last element carries the finish chunk, the usage chunk (when asked), [DONE]
    and the chunked-encoding terminator, so it goes out in one write.
    """
    events = [_chunk_event(b'{"role":"assistant","content":"' + WORDS[0] + b'"}')]
    for i in range(1, n_chunks - 1):
        events.append(_chunk_event(b'{"content":"' + WORDS[i % len(WORDS)] + b'"}'))
    tail = b""
    if n_chunks > 1:
        tail += _chunk_event(b"{}", b'"stop"')
    if usage:
        tail += _sse(
            b'{"id":"' + COMPLETION_ID.encode() + b'","object":"chat.completion.chunk",'
            b'"created":' + str(CREATED).encode() + b',"model":"' + MODEL.encode() + b'",'
            b'"system_fingerprint":"fp_bench","choices":[],"usage":' + USAGE + b"}"
        )
    tail += _sse(b"[DONE]") + b"0\r\n\r\n"
    if n_chunks > 1:
        events.append(tail)
    else:
        events[0] += tail
    return events


class Handler(Protocol):
    """What a server does with one complete request: answer it through ``conn``."""

    def __call__(self, conn: HttpProtocol, method: bytes, url: bytes, body: bytes) -> None: ...


class HttpProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive server connection over httptools.

    Requests that arrive while a streamed response is still going are queued and
    answered in order once it ends (``finish_response``).
    """

    __slots__ = (
        "_body",
        "_busy",
        "_handler",
        "_keep_alive",
        "_parser",
        "_queue",
        "_timers",
        "_url",
        "transport",
    )

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body: list[bytes] = []
        self._busy = False
        self._keep_alive = True
        self._queue: collections.deque[tuple[bytes, bytes, bytes, bool]] = collections.deque()
        self._timers: list[asyncio.TimerHandle] = []
        self.transport: asyncio.Transport | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(response_bytes(400, b'{"error":"bad request"}'))
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._queue.clear()
        self.transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method()
        body = b"".join(self._body)
        keep_alive = self._parser.should_keep_alive()
        if self._busy:
            self._queue.append((method, self._url, body, keep_alive))
            return
        self._dispatch(method, self._url, body, keep_alive)

    # for handlers
    def _dispatch(self, method: bytes, url: bytes, body: bytes, keep_alive: bool) -> None:
        self._busy = True
        self._keep_alive = keep_alive
        self._handler(self, method, url, body)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """A timer owned by the connection: cancelled if the client goes away."""
        if self.transport is None:
            return
        self._timers.append(asyncio.get_running_loop().call_later(delay, callback))

    def finish_response(self) -> None:
        """The current response is complete: close, or answer the next queued request."""
        self._busy = False
        self._timers.clear()
        if self.transport is None:
            return
        if not self._keep_alive:
            self.transport.close()
            return
        if self._queue:
            self._dispatch(*self._queue.popleft())

    def respond(self, data: bytes) -> None:
        """Send a complete response and finish it."""
        self.write(data)
        self.finish_response()


def wants_stream(body: bytes) -> bool:
    """A cheap look for ``"stream": true`` (the mock never parses a body)."""
    return b'"stream":true' in body or b'"stream": true' in body


class MockUpstream:
    """The OpenAI routes and Anthropic's /v1/messages: a handler for HttpProtocol."""

    def __init__(self, chunks: int = 20, chunk_delay_ms: float = 5.0) -> None:
        self.chunks = max(1, chunks)
        self.delay = chunk_delay_ms / 1000.0
        self.events = {
            True: stream_events(self.chunks, True),
            False: stream_events(self.chunks, False),
        }

    def __call__(self, conn: HttpProtocol, method: bytes, url: bytes, body: bytes) -> None:
        path = url.split(b"?", 1)[0]
        if path.endswith(b"/chat/completions") and method == b"POST":
            if b'"stream":true' in body or b'"stream": true' in body:
                self._stream(conn, self.events[b"include_usage" in body])
            else:
                conn.respond(COMPLETION_RESPONSE)
        elif path.endswith(b"/v1/messages") and method == b"POST":
            conn.respond(MESSAGE_STREAM_RESPONSE if wants_stream(body) else MESSAGE_RESPONSE)
        elif path.endswith(b"/models") and method == b"GET":
            conn.respond(MODELS_RESPONSE)
        else:
            conn.respond(NOT_FOUND_RESPONSE)

    def _stream(self, conn: HttpProtocol, events: list[bytes]) -> None:
        conn.write(STREAM_HEAD + events[0])
        if len(events) == 1:
            conn.finish_response()
            return
        state = {"i": 1}

        def send_next() -> None:
            i = state["i"]
            conn.write(events[i])
            state["i"] = i + 1
            if i + 1 < len(events):
                conn.call_later(self.delay, send_next)
            else:
                conn.finish_response()

        conn.call_later(self.delay, send_next)


def listen_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(
    handler: Handler, host: str, port: int, ready: Callable[[int], None] | None = None
) -> None:
    """Serve ``handler`` until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    sock = listen_socket(host, port)
    server = await loop.create_server(lambda: HttpProtocol(handler), sock=sock)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    if ready is not None:
        ready(sock.getsockname()[1])
    try:
        await stop
    finally:
        server.close()


def run(handler: Handler, host: str, port: int, label: str) -> None:
    """Run ``serve`` on uvloop (asyncio if uvloop is missing); print one ready line."""
    try:
        import uvloop

        runner: Callable[..., object] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run

    def ready(bound: int) -> None:
        print(f"{label} listening on http://{host}:{bound} pid={os.getpid()}", flush=True)

    runner(serve(handler, host, port, ready))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--chunks", type=int, default=20, help="chunks per stream (default 20)")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=5.0, help="gap between chunks (default 5 ms)"
    )
    args = parser.parse_args(argv)
    run(MockUpstream(args.chunks, args.chunk_delay_ms), args.host, args.port, "mock upstream")


if __name__ == "__main__":
    main()
