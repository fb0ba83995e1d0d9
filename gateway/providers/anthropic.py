"""Anthropic's Messages API: chat completions translated both ways; native pass-through.

`send()` takes the canonical OpenAI chat body and returns OpenAI JSON or an OpenAI chunk
stream (gateway.translate.anthropic_upstream), so the rest of the pipeline is the same as
for any provider. `send_native()` relays Anthropic's own API untranslated (/v1/messages).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
import yarl

from gateway.config import ProviderConfig
from gateway.pipeline.sse import SSEDecoder, is_sse
from gateway.providers.base import JSON_HEADERS, SSE_HEADERS, UpstreamResponse, rewritten_headers
from gateway.providers.http import AiohttpUpstream, UpstreamFactory
from gateway.translate.anthropic_common import (
    DONE,
    TranslationError,
    event_name,
    openai_error,
    openai_error_from_anthropic,
    sse_data,
)
from gateway.translate.anthropic_upstream import (
    MessagesRequest,
    StreamTranslator,
    chat_completion,
    messages_request,
)
from pricing.table import PriceTable, output_limit

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
FALLBACK_MAX_TOKENS = 4096  # max_tokens for a model the price table does not know
# not carried over from a response whose body we rewrote
# never taken from a caller of send_native: the provider's key is the only one that leaves
_AUTH_HEADERS = frozenset(("x-api-key", "authorization"))

if TYPE_CHECKING:
    from pricing.tokens import TokenCounter


def table_max_output() -> Callable[[str], int]:
    """The model's max output from the built-in price table, else FALLBACK_MAX_TOKENS."""
    table = PriceTable.load()
    return lambda model: output_limit(table.lookup(model, "anthropic"), FALLBACK_MAX_TOKENS)


class AnthropicProvider:
    kind: ClassVar[str] = "anthropic"
    operations: ClassVar[frozenset[str]] = frozenset(("chat",))  # translated; see send_native

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        *,
        max_output: Callable[[str], int] | None = None,
        counter: TokenCounter | None = None,  # the registry's: unused here
        upstream: UpstreamFactory | None = None,  # the HTTP client: AiohttpUpstream if None
    ) -> None:
        self.name = name
        self.config = config
        base = (config.base_url or DEFAULT_BASE_URL).rstrip("/")
        self.base_url = base.removesuffix("/v1")  # both spellings of the base work
        url = yarl.URL(self.base_url)
        self.server_address: str | None = url.host
        self.server_port: int | None = url.port or (443 if url.scheme == "https" else 80)
        self.http = (upstream or AiohttpUpstream)(config)
        self.client = self.http.client  # for the httpx instrumentation (telemetry.http_spans)
        self._headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",  # streams are read as they come; gzip costs CPU
            "anthropic-version": config.api_version or DEFAULT_VERSION,
            **config.headers,
            **self.auth_headers(),
        }
        # Anthropic requires max_tokens: a request without a cap gets the model's max output
        # (what admission reserved for it), looked up once per model.
        self._max_output = max_output or table_max_output()
        self._caps: dict[str, int] = {}
        self._urls: dict[str, Any] = {}  # the client's URL objects, built once
        self._betas = next(
            (v for k, v in config.headers.items() if k.lower() == "anthropic-beta"), None
        )

    def auth_headers(self) -> dict[str, str]:
        key = self.config.api_key
        if not key or key.lower() == "none":
            return {}
        return {"x-api-key": key}

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
        if operation != "chat":
            return refused(f"anthropic deployments serve chat completions, not '{operation}'.")
        try:
            request = messages_request(body, self.default_max_tokens(model))
        except TranslationError as exc:
            return refused(exc.message, exc.param)
        up = await self._post(
            "/v1/messages", orjson.dumps(request.body), headers, timeout_s, stream
        )
        if up.chunks is not None:  # a 200 to a stream request
            return UpstreamResponse(
                200,
                rewritten_headers(up.headers, SSE_HEADERS),
                chunks=translated_stream(up.chunks, request),
                close=up.close,
            )
        return translated_body(up.status, up.headers, up.body or b"", request)

    async def send_native(
        self,
        path: str,
        body: bytes | dict[str, Any],
        headers: Mapping[str, str],
        *,
        stream: bool,
        timeout_s: float,
    ) -> UpstreamResponse:
        """`body` POSTed to `path` (/v1/messages, /v1/messages/count_tokens) as it is, with
        the provider's key; `headers` (anthropic-version, anthropic-beta, x-request-id,
        traceparent) besides, except credentials. A caller's anthropic-beta adds to the
        configured one. The response comes back untranslated."""
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        extra = {k.lower(): v for k, v in headers.items() if k.lower() not in _AUTH_HEADERS}
        if self._betas and "anthropic-beta" in extra:
            extra["anthropic-beta"] = joined_betas(self._betas, extra["anthropic-beta"])
        return await self._post(path, content, extra, timeout_s, stream)

    def default_max_tokens(self, model: str) -> int:
        cap = self._caps.get(model)
        if cap is None:
            cap = self._caps[model] = self._max_output(model)
        return cap

    async def _post(
        self, path: str, content: bytes, headers: Mapping[str, str], timeout_s: float, stream: bool
    ) -> UpstreamResponse:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self.http.url(self.base_url + path)
        return await self.http.send(url, content, {**self._headers, **headers}, timeout_s, stream)


def joined_betas(configured: str, requested: str) -> str:
    """Both comma-separated anthropic-beta lists in one, each beta once, configured first."""
    names = [b.strip() for b in f"{configured},{requested}".split(",") if b.strip()]
    return ",".join(dict.fromkeys(names))


def refused(message: str, param: str | None = None) -> UpstreamResponse:
    """A request this provider cannot send: 400 in OpenAI's shape, nothing sent upstream."""
    body = openai_error(message, "invalid_request_error", "unsupported_by_provider", param)
    return UpstreamResponse(400, JSON_HEADERS, body=orjson.dumps(body))


def translated_body(
    status: int, headers: Mapping[str, str], content: bytes, request: MessagesRequest
) -> UpstreamResponse:
    """A whole response in OpenAI's shape: a chat completion, or an error with the same
    status. A success body that is not a Message (an HTML page from a proxy) is left as it
    is, for the pipeline to report as unreadable."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None
    if status >= 400:
        out = openai_error_from_anthropic(status, data, content)
    elif isinstance(data, dict) and data.get("type") == "message":
        out = chat_completion(data, created=int(time.time()), json_tool=request.json_tool)
    else:
        return UpstreamResponse(status, headers, body=content)
    return UpstreamResponse(
        status, rewritten_headers(headers, JSON_HEADERS), body=orjson.dumps(out)
    )


async def translated_stream(
    raw: AsyncIterator[bytes], request: MessagesRequest
) -> AsyncIterator[bytes]:
    """Anthropic's SSE bytes → OpenAI chunk SSE bytes, event by event as they arrive.

    Transport errors propagate (the relay reports them). Bytes that are not Anthropic's
    events pass through untouched, for the relay to report as an unreadable stream."""
    translator = StreamTranslator(
        created=int(time.time()), include_usage=request.include_usage, json_tool=request.json_tool
    )
    decoder = SSEDecoder()
    async for piece in raw:
        out = translate_events(translator, decoder.feed(piece))
        if out:
            yield out
    tail = decoder.tail()
    out = translate_events(translator, decoder.feed(b"\n\n")) if tail.strip() else b""
    if not translator.done:
        closing = translator.close()
        out += b"".join(sse_data(chunk) for chunk in closing)
        if translator.done:
            out += DONE
    if out:
        yield out


def translate_events(translator: StreamTranslator, events: Any) -> bytes:
    out = []
    for raw, data in events:
        if data is None:
            if not is_sse(raw):
                out.append(raw)
            continue
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            out.append(raw)
            continue
        if translator.done:
            continue
        out.extend(sse_data(chunk) for chunk in translator.feed(event_name(raw), obj))
        if translator.done and obj.get("type") != "error":
            out.append(DONE)
    return b"".join(out)
