"""OpenAI and every OpenAI-compatible server (vLLM, Ollama, Groq, Together, ...) by base_url."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import orjson

from gateway.config import ProviderConfig
from gateway.providers.base import OPERATION_PATHS, UpstreamResponse
from gateway.providers.http import make_client, timeouts

DEFAULT_BASE_URL = "https://api.openai.com/v1"

if TYPE_CHECKING:
    from pricing.tokens import TokenCounter


class OpenAIProvider:
    kind: ClassVar[str] = "openai"
    operations: ClassVar[frozenset[str]] = frozenset(OPERATION_PATHS)  # Responses too

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        client: httpx.AsyncClient | None = None,
        *,
        counter: TokenCounter | None = None,  # the registry's: unused here
    ) -> None:
        self.name = name
        self.config = config
        self.base_url = (config.base_url or DEFAULT_BASE_URL).rstrip("/")
        url = httpx.URL(self.base_url)
        self.server_address: str | None = url.host
        self.server_port: int | None = url.port or (443 if url.scheme == "https" else 80)
        self.client = client or make_client(config)
        # identity: streams are relayed byte for byte, and gzip costs CPU we need elsewhere
        self._headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            **config.headers,
            **self.auth_headers(),
        }
        self._timeouts: dict[float, dict[str, float | None]] = {}
        self._urls: dict[tuple[str, str], httpx.URL] = {}

    def auth_headers(self) -> dict[str, str]:
        key = self.config.api_key
        if not key or key.lower() == "none":
            return {}
        return {"authorization": f"Bearer {key}"}

    def url_for(self, operation: str, model: str) -> str:
        return self.base_url + OPERATION_PATHS[operation]

    async def aclose(self) -> None:
        await self.client.aclose()

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
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            timeout = self._timeouts[timeout_s] = timeouts(self.config, timeout_s).as_dict()
        url = self._urls.get((operation, model))
        if url is None:
            url = self._urls[(operation, model)] = httpx.URL(self.url_for(operation, model))
        request = httpx.Request(
            "POST",
            url,
            content=orjson.dumps(body),
            headers={**self._headers, **headers},
            extensions={"timeout": timeout},
        )
        # Straight to the (instrumented) transport; see gateway.providers.http.make_client.
        response = await self.client._transport.handle_async_request(request)
        if stream and response.status_code == 200:
            return UpstreamResponse(
                response.status_code,
                response.headers,
                chunks=response.aiter_raw(),
                close=response.aclose,
            )
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return UpstreamResponse(response.status_code, response.headers, body=content)
