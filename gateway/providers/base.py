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


JSON_HEADERS: Mapping[str, str] = {"content-type": "application/json"}
SSE_HEADERS: Mapping[str, str] = {"content-type": "text/event-stream"}
# not carried over from a response whose body was rewritten
_BODY_HEADERS = frozenset(
    ("content-length", "content-encoding", "transfer-encoding", "content-type")
)


def rewritten_headers(upstream: Mapping[str, str], kind: Mapping[str, str]) -> dict[str, str]:
    """The upstream's headers (retry-after, request-id, ...) for a body we rewrote, named in
    lower case (looked up so in a plain dict; aiohttp keeps the upstream's spelling), and
    the rewritten body's content type."""
    out = {n: v for k, v in upstream.items() if (n := k.lower()) not in _BODY_HEADERS}
    out.update(kind)
    return out


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
