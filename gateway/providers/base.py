"""The provider shape: a canonical (OpenAI-format) request in, an UpstreamResponse out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from gateway.config import ProviderConfig

# API name (gateway/pipeline/apis.py) → the OpenAI path suffix it is served at
OPERATION_PATHS = {
    "chat": "/chat/completions",
    "text_completion": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",
}
# what every provider serves; the others only a provider whose `operations` lists them
BASE_OPERATIONS = frozenset(("chat", "text_completion", "embeddings"))


def operations(provider: object) -> frozenset[str]:
    """The APIs a provider serves: its class's `operations`, else the base ones."""
    return getattr(provider, "operations", BASE_OPERATIONS)


async def _nothing() -> None:
    return None


@dataclass(slots=True)
class UpstreamResponse:
    """What came back: a whole body, or (status 200 and streaming) an iterator of raw bytes."""

    status: int
    headers: Mapping[str, str]
    body: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None
    close: Callable[[], Awaitable[None]] = _nothing


class Provider(Protocol):
    kind: ClassVar[str]
    # optional: `operations: ClassVar[frozenset[str]]`, the APIs served (default: BASE_OPERATIONS)
    name: str
    config: ProviderConfig
    server_address: str | None
    server_port: int | None

    async def aclose(self) -> None: ...

    async def send(
        self,
        operation: str,
        model: str,
        body: dict[str, Any],
        *,
        stream: bool,
        timeout_s: float,
        headers: Mapping[str, str],
    ) -> UpstreamResponse:
        """Send ``body`` (model already rewritten) upstream, with ``headers`` (x-request-id,
        traceparent) besides the provider's own. Raises its HTTP client's errors (aiohttp's
        or httpx's, gateway.providers.http) on transport failure; those are mapped to
        gateway errors in one place (gateway.pipeline.upstream_errors)."""
        ...
