"""The providers' HTTP client: a body POSTed to a URL, an UpstreamResponse back.

One small interface (`Upstream`), two implementations, chosen where providers are built
(gateway/state.py `new_provider`):

- `AiohttpUpstream`, the default: a plain aiohttp.ClientSession per provider. About 77 µs
  of CPU per request, against 130 µs for an httpx.Request sent into the same aiohttp
  transport (bench/README.md, "Upstream transport").
- `HttpxUpstream`, with `telemetry.http_spans`: the OpenTelemetry httpx instrumentation
  hooks httpx clients, so its `client` is there to be instrumented.

Transport failures are raised as they come (aiohttp's or httpx's exceptions):
gateway.pipeline.upstream_errors maps both.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import aiohttp
import httpx
import yarl

from gateway.config import ProviderConfig
from gateway.providers.base import UpstreamResponse

KEEPALIVE_S = 30  # an idle upstream connection is kept this long


class Upstream(Protocol):
    # the httpx client the OpenTelemetry instrumentation hooks; None when there is none
    client: httpx.AsyncClient | None

    def url(self, text: str) -> Any:
        """`text` parsed into what `send` takes (built once per URL by the provider)."""
        ...

    async def send(
        self, url: Any, body: bytes, headers: Mapping[str, str], timeout_s: float, stream: bool
    ) -> UpstreamResponse:
        """POST `body`. A 200 to a `stream` request comes back as `chunks` (raw bytes, any
        split) and a `close` that releases the connection; anything else is read whole and
        the connection released."""
        ...

    async def aclose(self) -> None: ...


UpstreamFactory = Callable[[ProviderConfig], Upstream]


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default context (certifi's CAs, SSL_CERT_FILE / SSL_CERT_DIR honoured), so
    both clients trust the same servers. One per process: loading the CAs takes ~20 ms."""
    return httpx.create_ssl_context()


class AiohttpUpstream:
    """A plain aiohttp.ClientSession: pooled keep-alive connections, no cookie jar, no
    decompression (the providers ask for `accept-encoding: identity`), no redirects."""

    client: httpx.AsyncClient | None = None

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._tls = tls_context()
        self._session: aiohttp.ClientSession | None = None  # opened on the first send
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def url(self, text: str) -> yarl.URL:
        return yarl.URL(text)

    async def send(
        self, url: Any, body: bytes, headers: Mapping[str, str], timeout_s: float, stream: bool
    ) -> UpstreamResponse:
        timeout = self._timeouts.get(timeout_s) or self._timeout(timeout_s)
        session = self._session or self._open()
        response = await session.post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        )
        if stream and response.status == 200:
            chunks = Chunks(response)
            return UpstreamResponse(200, response.headers, chunks=chunks, close=chunks.close)
        try:
            content = await response.read()
        finally:
            response.release()
        return UpstreamResponse(response.status, response.headers, body=content)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _open(self) -> aiohttp.ClientSession:
        # Here rather than in __init__: aiohttp binds a session to the running loop.
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections, keepalive_timeout=KEEPALIVE_S, ssl=self._tls
        )
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
        )
        return self._session

    def _timeout(self, read_s: float) -> aiohttp.ClientTimeout:
        # connect covers waiting for a pooled connection too (httpx's pool timeout);
        # sock_read is per read, so a stream may last as long as its chunks keep coming.
        connect = self.config.connect_timeout_s
        timeout = aiohttp.ClientTimeout(connect=connect, sock_connect=connect, sock_read=read_s)
        self._timeouts[read_s] = timeout
        return timeout


class Chunks:
    """A streamed response's bytes as they arrive; `close` releases its connection (back to
    the pool if the body was read to its end, else closed)."""

    __slots__ = ("_read", "_response")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._read = response.content.readany

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        data = await self._read()
        if data:
            return data
        raise StopAsyncIteration

    async def close(self) -> None:
        self._response.release()


class HttpxUpstream:
    """An httpx.Request sent straight into httpx_aiohttp's transport (what the OpenTelemetry
    instrumentation wraps), past the client's own layers (auth, redirects, cookies, URL
    merging), which do nothing for us and cost a quarter of the upstream CPU."""

    def __init__(self, config: ProviderConfig) -> None:
        from httpx_aiohttp import AiohttpTransport

        self.config = config
        limits = httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_connections,
            keepalive_expiry=KEEPALIVE_S,
        )
        self._client = httpx.AsyncClient(
            transport=AiohttpTransport(limits=limits), timeout=self._timeout(config.timeout_s)
        )
        self.client: httpx.AsyncClient | None = self._client
        self._timeouts: dict[float, dict[str, float | None]] = {}

    def url(self, text: str) -> httpx.URL:
        return httpx.URL(text)

    async def send(
        self, url: Any, body: bytes, headers: Mapping[str, str], timeout_s: float, stream: bool
    ) -> UpstreamResponse:
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            timeout = self._timeouts[timeout_s] = self._timeout(timeout_s).as_dict()
        request = httpx.Request(
            "POST", url, content=body, headers=headers, extensions={"timeout": timeout}
        )
        # through the client's public send (the instrumentation wraps its transport); the
        # request's own timeout extension is kept (httpx sets the client's only when absent)
        response = await self._client.send(request, stream=True)
        if stream and response.status_code == 200:
            return UpstreamResponse(
                200, response.headers, chunks=response.aiter_raw(), close=response.aclose
            )
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return UpstreamResponse(response.status_code, response.headers, body=content)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _timeout(self, read_s: float) -> httpx.Timeout:
        connect = self.config.connect_timeout_s
        return httpx.Timeout(read_s, connect=connect, pool=connect)
