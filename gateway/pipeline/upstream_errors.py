"""The one place transport failures talking to a provider become gateway errors.

`mapped()` wraps a provider's send and its stream, as httpx's map_httpcore_exceptions
does: past it, a failure is an UpstreamError or UpstreamTimeout whose `kind` is the
attempt's low-cardinality error.type, never an OSError or an aiohttp/httpx exception."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import aiohttp
import httpx

from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout
from gateway.providers.base import UpstreamResponse

# aiohttp's (the default client) and httpx's (telemetry.http_spans) exceptions, and what
# either lets through unwrapped
TRANSPORT_ERRORS = (aiohttp.ClientError, httpx.HTTPError, asyncio.TimeoutError, OSError)


def error_type(exc: BaseException) -> str:
    """Low-cardinality error.type for spans and metrics: the same for an aiohttp exception
    whether it comes raw or wrapped by the httpx transport."""
    cause = exc.__cause__
    if isinstance(exc, httpx.HTTPError) and isinstance(cause, aiohttp.ClientError):
        # httpx_aiohttp maps *every* aiohttp connection error to httpx.ConnectTimeout:
        # classify the aiohttp exception it chained, not the httpx class
        return aiohttp_error_type(cause)
    if isinstance(exc, aiohttp.ClientError):
        return aiohttp_error_type(exc)
    if isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, httpx.ConnectError | ConnectionRefusedError):
        return "connection_error"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return "protocol_error"
    return "transport_error"


def aiohttp_error_type(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, asyncio.TimeoutError):  # ServerTimeoutError and its subclasses
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return "connection_error"
    # the connection closed before the response, or in the middle of its body
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "protocol_error"
    return "transport_error"


UpstreamFailure = UpstreamError | UpstreamTimeout
UPSTREAM_FAILURES = (UpstreamError, UpstreamTimeout)  # what mapped() raises


def map_transport_error(exc: BaseException, deployment: str) -> UpstreamFailure:
    kind = error_type(exc)
    err: UpstreamFailure
    if kind == "timeout":
        err = UpstreamTimeout(f"The upstream deployment '{deployment}' timed out.")
    else:
        what = {
            "connection_error": "could not be reached",
            "protocol_error": "closed the connection",
        }.get(kind, "failed")
        err = UpstreamError(f"The upstream deployment '{deployment}' {what}.")
    err.kind = kind
    return err


async def mapped(send: Awaitable[UpstreamResponse], deployment: str) -> UpstreamResponse:
    """The provider's response, its transport failures (and its stream's) mapped."""
    try:
        up = await send
    except TRANSPORT_ERRORS as exc:
        raise map_transport_error(exc, deployment) from exc
    if up.chunks is not None:
        up.chunks = MappedChunks(up.chunks, deployment)
    return up


class MappedChunks:
    """A stream's raw chunks, a transport failure raised as the gateway's error (a class,
    not an async generator: one call per chunk)."""

    __slots__ = ("_chunks", "_deployment")

    def __init__(self, chunks: AsyncIterator[bytes], deployment: str) -> None:
        self._chunks = chunks.__aiter__()
        self._deployment = deployment

    def __aiter__(self) -> MappedChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except TRANSPORT_ERRORS as exc:
            raise map_transport_error(exc, self._deployment) from exc


def upstream_status_error(status: int, deployment: str, attempts: int) -> GatewayError:
    return UpstreamError(
        f"The upstream deployment '{deployment}' answered HTTP {status} "
        f"({attempts} attempt{'s' if attempts != 1 else ''} made)."
    )


def unreadable_response(deployment: str, what: str) -> GatewayError:
    """A response with a success status that is not in OpenAI's format (an HTML page from a
    proxy, plain text, binary): the client's SDK could not read it either."""
    return UpstreamError(
        f"The upstream deployment '{deployment}' answered with {what}, "
        "not an OpenAI-format response."
    )
