"""The bare pass-through: the gateway's stack with no features, the ceiling of our libraries.

starlette + uvicorn (uvloop, httptools) + one shared upstream client built in the
lifespan. POST /v1/chat/completions forwards the body bytes to the upstream and returns
its body; a streamed answer is relayed chunk by chunk. No auth, no parsing: the only
look at the body is a byte search for ``"stream": true``.

    python -m bench.passthrough --port 9002 --upstream http://127.0.0.1:9001 \
        [--transport default|aiohttp|aiohttp-tuned|aiohttp-transport|raw-aiohttp]

``default`` is httpx's own transport (httpcore), ``aiohttp`` is httpx over
``httpx_aiohttp.AiohttpTransport``, ``aiohttp-tuned`` the same with the upstream URL
parsed once and no cookie jar (``tune``), ``aiohttp-transport`` sends an httpx.Request
straight to the transport past the client's layers (what gateway/providers does),
``raw-aiohttp`` drops httpx for a plain
``aiohttp.ClientSession`` (a reference point, not a candidate: it loses the httpx API
and its OpenTelemetry instrumentation).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

Transport = Literal["default", "aiohttp", "aiohttp-tuned", "aiohttp-transport", "raw-aiohttp"]
TRANSPORTS: tuple[Transport, ...] = (
    "default",
    "aiohttp",
    "aiohttp-tuned",
    "aiohttp-transport",
    "raw-aiohttp",
)
UPSTREAM_HEADERS = {"content-type": "application/json", "authorization": "Bearer bench"}
# Enough pooled keep-alive connections for concurrency 64 (httpx keeps 20 by default,
# which would make every request past the 20th open a new connection).
LIMITS = httpx.Limits(max_connections=1024, max_keepalive_connections=1024, keepalive_expiry=60)
TIMEOUT = httpx.Timeout(60.0)


def is_stream(body: bytes) -> bool:
    return b'"stream":true' in body or b'"stream": true' in body


class NoCookies(httpx.Cookies):
    """A cookie jar that never stores a cookie.

    httpx runs every response through its jar (``Cookies.extract_cookies`` builds a
    urllib request per response: ~15 % of httpx-over-aiohttp's CPU per request), and a
    gateway must not keep a provider's cookies anyway: they would be replayed on other
    teams' requests.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


def tune(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """The cheap per-request savings: no cookie jar (see NoCookies)."""
    client._cookies = NoCookies()  # the public setter would wrap it in a plain Cookies
    return client


def make_httpx_client(transport: Transport) -> httpx.AsyncClient:
    """One shared httpx client on the chosen transport."""
    if transport in ("aiohttp", "aiohttp-tuned", "aiohttp-transport"):
        from httpx_aiohttp import AiohttpTransport

        client = httpx.AsyncClient(
            transport=AiohttpTransport(limits=LIMITS), limits=LIMITS, timeout=TIMEOUT
        )
        return tune(client) if transport == "aiohttp-tuned" else client
    return httpx.AsyncClient(limits=LIMITS, timeout=TIMEOUT)


Endpoint = Callable[[Request], Awaitable[Response]]


def httpx_endpoint(client: httpx.AsyncClient, url: str | httpx.URL) -> Endpoint:
    async def chat_completions(request: Request) -> Response:
        body = await request.body()
        if is_stream(body):
            upstream = await client.send(
                client.build_request("POST", url, content=body, headers=UPSTREAM_HEADERS),
                stream=True,
            )
            return StreamingResponse(
                upstream.aiter_raw(),
                status_code=upstream.status_code,
                media_type=upstream.headers.get("content-type"),
                background=BackgroundTask(upstream.aclose),
            )
        upstream = await client.post(url, content=body, headers=UPSTREAM_HEADERS)
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type"),
        )

    return chat_completions


def transport_endpoint(client: httpx.AsyncClient, url: httpx.URL) -> Endpoint:
    """httpx.Request straight into the client's transport, as gateway/providers does."""
    transport = client._transport

    async def chat_completions(request: Request) -> Response:
        body = await request.body()
        upstream = await transport.handle_async_request(
            httpx.Request("POST", url, content=body, headers=UPSTREAM_HEADERS)
        )
        if is_stream(body):
            return StreamingResponse(
                upstream.aiter_raw(),
                status_code=upstream.status_code,
                media_type=upstream.headers.get("content-type"),
                background=BackgroundTask(upstream.aclose),
            )
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
        return Response(
            content,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type"),
        )

    return chat_completions


def aiohttp_endpoint(session: object, url: str) -> Endpoint:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)

    async def relay(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        async for chunk in resp.content.iter_any():
            yield chunk

    async def chat_completions(request: Request) -> Response:
        body = await request.body()
        resp = await session.post(url, data=body, headers=UPSTREAM_HEADERS)
        if is_stream(body):
            return StreamingResponse(
                relay(resp),
                status_code=resp.status,
                media_type=resp.headers.get("content-type"),
                background=BackgroundTask(resp.release),
            )
        content = await resp.read()
        resp.release()
        return Response(content, status_code=resp.status, media_type=resp.content_type)

    return chat_completions


def make_app(upstream: str, transport: Transport) -> Starlette:
    url = upstream.rstrip("/") + "/v1/chat/completions"
    endpoint: dict[str, Endpoint] = {}

    async def chat_completions(request: Request) -> Response:
        return await endpoint["chat"](request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if transport == "raw-aiohttp":
            import aiohttp

            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1024, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=60),
                auto_decompress=False,
            )
            endpoint["chat"] = aiohttp_endpoint(session, url)
            try:
                yield
            finally:
                await session.close()
            return
        client = make_httpx_client(transport)
        if transport == "aiohttp-transport":
            endpoint["chat"] = transport_endpoint(client, httpx.URL(url))
        else:
            # tuned: parse the upstream URL once, not on every request
            endpoint["chat"] = httpx_endpoint(
                client, httpx.URL(url) if transport == "aiohttp-tuned" else url
            )
        try:
            yield
        finally:
            await client.aclose()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    parser.add_argument(
        "--upstream", default="http://127.0.0.1:9001", help="mock upstream base URL"
    )
    parser.add_argument("--transport", choices=TRANSPORTS, default="default")
    parser.add_argument(
        "--accept",
        choices=("uvloop", "batch"),
        default="uvloop",
        help="uvloop's own accept (one connection per loop turn, the bare stack) or the "
        "gateway's batch listener (gateway/server/listener.py)",
    )
    args = parser.parse_args(argv)
    print(
        f"passthrough ({args.transport}) on http://{args.host}:{args.port} -> {args.upstream}",
        flush=True,
    )
    uvicorn.run(
        make_app(args.upstream, args.transport),
        host=args.host,
        port=args.port,
        loop="uvloop" if args.accept == "uvloop" else "gateway.server.listener:new_event_loop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
