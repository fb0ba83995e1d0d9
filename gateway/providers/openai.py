"""OpenAI and every OpenAI-compatible server (vLLM, Ollama, Groq, Together, ...) by base_url."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
import yarl

from gateway.config import ProviderConfig
from gateway.providers.base import OPERATION_PATHS, UpstreamResponse
from gateway.providers.http import AiohttpUpstream, UpstreamFactory

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
        *,
        counter: TokenCounter | None = None,  # the registry's: unused here
        upstream: UpstreamFactory | None = None,  # the HTTP client: AiohttpUpstream if None
    ) -> None:
        self.name = name
        self.config = config
        self.base_url = (config.base_url or DEFAULT_BASE_URL).rstrip("/")
        url = yarl.URL(self.base_url)
        self.server_address: str | None = url.host
        self.server_port: int | None = url.port or (443 if url.scheme == "https" else 80)
        self.http = (upstream or AiohttpUpstream)(config)
        self.client = self.http.client  # for the httpx instrumentation (telemetry.http_spans)
        # identity: streams are relayed byte for byte, and gzip costs CPU we need elsewhere
        self._headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            **config.headers,
            **self.auth_headers(),
        }
        self._urls: dict[tuple[str, str], Any] = {}  # the client's URL objects, built once

    def auth_headers(self) -> dict[str, str]:
        key = self.config.api_key
        if not key or key.lower() == "none":
            return {}
        return {"authorization": f"Bearer {key}"}

    def url_for(self, operation: str, model: str) -> str:
        return self.base_url + OPERATION_PATHS[operation]

    async def aclose(self) -> None:
        await self.http.aclose()

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
        url = self._urls.get((operation, model))
        if url is None:
            url = self._urls[(operation, model)] = self.http.url(self.url_for(operation, model))
        return await self.http.send(
            url, orjson.dumps(body), {**self._headers, **headers}, timeout_s, stream
        )
