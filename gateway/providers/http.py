"""The upstream HTTP client: one pooled httpx.AsyncClient per provider, on the aiohttp transport."""

from __future__ import annotations

import httpx

from gateway.config import ProviderConfig


def make_client(config: ProviderConfig) -> httpx.AsyncClient:
    """A pooled client with explicit timeouts.

    The aiohttp transport keeps httpx's API (and its OpenTelemetry instrumentation) at
    roughly half the CPU per request of httpx's default transport (bench/bench_transport.py).
    """
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(
        max_connections=config.max_connections,
        max_keepalive_connections=config.max_connections,
        keepalive_expiry=30,
    )
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits),
        timeout=timeouts(config, config.timeout_s),
        limits=limits,
    )


def timeouts(config: ProviderConfig, read_s: float) -> httpx.Timeout:
    return httpx.Timeout(read_s, connect=config.connect_timeout_s, pool=config.connect_timeout_s)
