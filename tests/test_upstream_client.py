"""The providers' HTTP client (gateway/providers/http.py) against real loopback servers.

Both implementations, plain aiohttp (the default) and httpx (telemetry.http_spans), are held
to the same contract: each transport failure becomes the same error.type and the same
message to the client (gateway/pipeline/upstream_errors.py), a stream comes through byte for byte,
and connections are kept alive between requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from httpx_aiohttp.transport import map_aiohttp_exceptions
from opentelemetry.trace import SpanKind

from gateway.config import ProviderConfig
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.pipeline.upstream_errors import error_type, mapped
from gateway.providers.base import UpstreamResponse
from gateway.providers.http import AiohttpUpstream, HttpxUpstream, UpstreamFactory
from gateway.providers.openai import OpenAIProvider
from tests.fake_upstream import Close, FakeUpstream, Hang, Scope, Stream, chat_chunk
from tests.gateway_harness import KEYS, merge, running_gateway
from tests.servers import ServerThread, free_port, run_server, wait_until

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
DEPLOYMENT = "up/gpt-4o-mini"


@pytest.fixture(params=[AiohttpUpstream, HttpxUpstream], ids=["aiohttp", "httpx"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """make(base_url, **config) -> an OpenAIProvider on the client under test."""
    upstream: UpstreamFactory = request.param
    made: list[OpenAIProvider] = []

    def build(base_url: str, **config: Any) -> OpenAIProvider:
        settings = ProviderConfig(kind="openai", base_url=base_url, api_key="k", **config)
        made.append(OpenAIProvider("up", settings, upstream=upstream))
        return made[-1]

    yield build
    for provider in made:
        await provider.aclose()


async def send(
    provider: OpenAIProvider, *, stream: bool = False, timeout_s: float = 5
) -> UpstreamResponse:
    """One chat request, its failures mapped as the gateway maps them."""
    body = {**CHAT, "stream": stream}
    sent = provider.send("chat", "gpt-4o-mini", body, stream=stream, timeout_s=timeout_s,
                         headers={"x-request-id": "req_1"})  # fmt: skip
    return await mapped(sent, DEPLOYMENT)


async def read_all(up: UpstreamResponse) -> bytes:
    assert up.chunks is not None
    try:
        return b"".join([piece async for piece in up.chunks])
    finally:
        await up.close()


# ---- each transport failure, one error.type and one message -----------------------------


async def test_a_refused_port_is_a_connection_error(make: Any) -> None:
    provider = make(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(UpstreamError) as exc:
        await send(provider)
    assert exc.value.kind == "connection_error"
    assert exc.value.message == f"The upstream deployment '{DEPLOYMENT}' could not be reached."


async def test_a_connection_closed_before_the_response_is_a_protocol_error(
    make: Any, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Close())
    with pytest.raises(UpstreamError) as exc:
        await send(make(fake_upstream.base_url))
    assert exc.value.kind == "protocol_error"
    assert exc.value.message == f"The upstream deployment '{DEPLOYMENT}' closed the connection."


@contextlib.asynccontextmanager
async def cut_short(reply: bytes) -> AsyncIterator[str]:
    """A loopback server that reads one request, writes `reply` and closes the connection
    (fake_upstream cannot cut a whole response short: uvicorn completes what it starts)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def test_a_body_cut_short_is_a_protocol_error(make: Any) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    async with cut_short(head + b'{"id": "chatcmpl-1", "cho') as url:
        with pytest.raises(UpstreamError) as exc:
            await send(make(url))
    assert exc.value.kind == "protocol_error"
    assert exc.value.message == f"The upstream deployment '{DEPLOYMENT}' closed the connection."


async def test_a_stream_cut_short_is_a_protocol_error_after_its_chunks(
    make: Any, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Stream([chat_chunk("partial "), chat_chunk("answer ")], drop_after=2))
    up = await send(make(fake_upstream.base_url), stream=True)
    assert up.status == 200 and up.chunks is not None
    got = b""
    with pytest.raises(UpstreamError) as exc:
        async for piece in up.chunks:
            got += piece
    await up.close()
    assert got.count(b"data: ") == 2 and b"answer " in got  # what came before the drop
    assert exc.value.kind == "protocol_error"


async def test_a_stall_past_the_timeout_is_a_timeout(
    make: Any, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Hang(5))
    with pytest.raises(UpstreamTimeout) as exc:
        await send(make(fake_upstream.base_url), timeout_s=0.3)
    assert exc.value.kind == "timeout"
    assert exc.value.message == f"The upstream deployment '{DEPLOYMENT}' timed out."
    await wait_for_disconnect(fake_upstream)  # the request was given up, not left running


async def test_a_stream_that_stalls_past_the_timeout_is_a_timeout(
    make: Any, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Stream([chat_chunk("first "), chat_chunk("late")], delay_s=5))
    up = await send(make(fake_upstream.base_url), stream=True, timeout_s=0.3)
    assert up.chunks is not None
    first = await up.chunks.__anext__()
    with pytest.raises(UpstreamTimeout) as exc:
        await up.chunks.__anext__()
    await up.close()
    assert b"first " in first and exc.value.kind == "timeout"
    await wait_for_disconnect(fake_upstream)


async def wait_for_disconnect(fake: FakeUpstream) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while fake.disconnects < 1:
        assert asyncio.get_running_loop().time() < deadline, "the upstream saw no disconnect"
        await asyncio.sleep(0.01)


# The same aiohttp exception, raw (plain aiohttp) or wrapped by httpx_aiohttp's transport
# (telemetry.http_spans): one error.type. (Connector errors need a real connection attempt:
# the refused-port test covers them on both clients.)
AIOHTTP_ERRORS = [
    (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), "timeout"),
    (aiohttp.ConnectionTimeoutError("Connection timeout to host"), "timeout"),
    (aiohttp.ServerTimeoutError("timeout"), "timeout"),
    (aiohttp.ServerDisconnectedError(), "protocol_error"),
    (aiohttp.ClientPayloadError("Response payload is not completed"), "protocol_error"),
    (aiohttp.ClientOSError(104, "Connection reset by peer"), "transport_error"),
    (aiohttp.ClientConnectionResetError("Cannot write to closing transport"), "transport_error"),
]


@pytest.mark.parametrize(
    ("exc", "kind"), AIOHTTP_ERRORS, ids=[type(e).__name__ for e, _ in AIOHTTP_ERRORS]
)
def test_an_aiohttp_error_has_one_type_raw_or_wrapped_by_httpx(
    exc: aiohttp.ClientError, kind: str
) -> None:
    with pytest.raises(httpx.HTTPError) as wrapped:
        with map_aiohttp_exceptions():
            raise exc
    assert error_type(exc) == kind
    assert error_type(wrapped.value) == kind


def test_bare_os_errors_are_classified_too() -> None:
    assert error_type(TimeoutError()) == "timeout"
    assert error_type(ConnectionRefusedError(111, "refused")) == "connection_error"


# ---- streams and connections ---------------------------------------------------------------


async def test_a_stream_comes_through_byte_for_byte(make: Any, fake_upstream: FakeUpstream) -> None:
    # events split mid-line and mid-event, a comment, CRLF endings: the relay's business
    pieces = [": keep-alive\r\n\r\n", 'data: {"id":"c1","object":"chat.comp',
              'letion.chunk","choices":[]}\r\n', "\r\ndata: [DO", "NE]\n\n"]  # fmt: skip
    fake_upstream.enqueue(Stream(pieces, done=False))
    up = await send(make(fake_upstream.base_url), stream=True)
    assert up.status == 200 and up.headers["content-type"] == "text/event-stream"
    assert await read_all(up) == "".join(pieces).encode()


async def test_a_stream_answered_with_an_error_is_read_whole(
    make: Any, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Stream([chat_chunk("never")], status=429, headers={"Retry-After": "7"}))
    up = await send(make(fake_upstream.base_url), stream=True)
    assert up.status == 429 and up.chunks is None and up.body is not None
    assert b"never" in up.body
    assert up.headers.get("retry-after") == "7"  # looked up in lower case, as the gateway does


class CountingConnections:
    """An ASGI app's wrapper that records each request's client port: one per connection."""

    def __init__(self, app: FakeUpstream) -> None:
        self.app = app
        self.ports: list[int] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.ports.append(scope["client"][1])
        await self.app(scope, receive, send)


@pytest.fixture
def counted() -> Iterator[tuple[CountingConnections, ServerThread]]:
    app = CountingConnections(FakeUpstream())
    with run_server(app) as server:
        yield app, server


async def test_connections_are_kept_alive_between_requests(
    make: Any, counted: tuple[CountingConnections, ServerThread]
) -> None:
    app, server = counted
    provider = make(server.url + "/v1")
    for _ in range(10):
        up = await send(provider)
        assert up.status == 200 and b"hello there" in (up.body or b"")
        streamed = await read_all(await send(provider, stream=True))
        assert streamed.endswith(b"data: [DONE]\n\n")
    assert len(app.ports) == 20 and len(set(app.ports)) == 1


async def test_a_stream_closed_early_closes_its_connection(
    make: Any, counted: tuple[CountingConnections, ServerThread]
) -> None:
    app, server = counted
    app.app.enqueue(Stream([chat_chunk(f"w{i} ") for i in range(50)], delay_s=0.01))
    provider = make(server.url + "/v1")
    up = await send(provider, stream=True)
    assert up.chunks is not None
    await up.chunks.__anext__()
    await up.close()  # mid-stream: the rest of the body is not waited for
    assert (await send(provider)).status == 200  # on a fresh connection
    assert len(app.ports) == 2 and app.ports[0] != app.ports[1]
    wait_until(lambda: app.app.disconnects == 1, what="the upstream to see the close")


# ---- through the gateway: the client chosen by telemetry.http_spans ----------------------


@pytest.mark.parametrize("http_spans", [False, True], ids=["aiohttp", "httpx"])
def test_the_gateway_reports_a_refused_upstream_the_same_on_either_client(
    gateway_config: dict, http_spans: bool
) -> None:
    cfg = merge(
        gateway_config, {"telemetry": {"http_spans": http_spans}, "routing": {"retries": 0}}
    )
    cfg["providers"]["up"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"
    with running_gateway(cfg) as gw:
        provider = gw.gateway.providers["up"]
        assert type(provider.http) is (HttpxUpstream if http_spans else AiohttpUpstream)
        assert (provider.client is not None) is http_spans  # what the instrumentation hooks
        r = httpx.post(
            gw.base_url + "/chat/completions",
            headers={"authorization": f"Bearer {KEYS['alpha']}"},
            json=CHAT,
        )
        wait_until(lambda: bool(attempt_spans(gw)), what="the attempt's span")
        [attempt] = attempt_spans(gw)
    assert r.status_code == 502
    assert r.json()["error"]["message"].endswith("could not be reached.")
    assert attempt.attributes["error.type"] == "connection_error"


def attempt_spans(gw: Any) -> list[Any]:
    return [
        s
        for s in gw.spans.get_finished_spans()
        if s.kind == SpanKind.CLIENT and s.attributes.get("gen_ai.operation.name")
    ]
