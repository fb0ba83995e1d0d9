"""The one place transport failures talking to a provider become gateway errors."""

from __future__ import annotations

import asyncio

import httpx

from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout

TRANSPORT_ERRORS = (httpx.HTTPError, asyncio.TimeoutError, OSError)


def is_timeout(exc: BaseException) -> bool:
    # The aiohttp transport maps *every* aiohttp connection error to httpx.ConnectTimeout,
    # so look at the cause it chained before believing the httpx class.
    cause = exc.__cause__
    if cause is not None and cause.__class__.__module__.startswith("aiohttp"):
        return isinstance(cause, asyncio.TimeoutError) or "Timeout" in type(cause).__name__
    return isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError)


def error_type(exc: BaseException) -> str:
    """Low-cardinality error.type for spans and metrics."""
    if is_timeout(exc):
        return "timeout"
    cause = exc.__cause__ or exc
    name = type(cause).__name__
    if (
        isinstance(exc, httpx.ConnectError)
        or "Connector" in name
        or isinstance(cause, ConnectionRefusedError)
    ):
        return "connection_error"
    if (
        isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError)
        or "Disconnected" in name
        or "Payload" in name
    ):
        return "protocol_error"
    return "transport_error"


def map_transport_error(exc: BaseException, deployment: str) -> GatewayError:
    kind = error_type(exc)
    if kind == "timeout":
        return UpstreamTimeout(f"The upstream deployment '{deployment}' timed out.")
    what = {
        "connection_error": "could not be reached",
        "protocol_error": "closed the connection",
    }.get(kind, "failed")
    return UpstreamError(f"The upstream deployment '{deployment}' {what}.")


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
