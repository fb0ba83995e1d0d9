"""The inference APIs the gateway serves, and the few things each does its own way.

Every endpoint runs the one pipeline (gateway/pipeline/handle.py); where a stage depends on the
protocol it asks the request's Api rather than which route it came from. Adding an
endpoint is one more Api here, its route in gateway/app.py, its observers in
gateway/pipeline/metering.py and, if it needs them, its error shape and an adapter (`send`) for the
deployments that do not speak its protocol (gateway/pipeline/ingress.py, for /v1/messages)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.responses import Response

from gateway.errors import GatewayError, InvalidRequest, error_response
from gateway.pipeline import ingress
from gateway.pipeline.context import RequestContext
from gateway.pipeline.metering import (
    MessagesStreamObserver,
    ResponsesStreamObserver,
    StreamObserver,
    observe_body,
    observe_message,
    observe_response,
)
from gateway.providers.base import UpstreamResponse
from gateway.translate.anthropic_common import anthropic_error_type


class Observer(Protocol):
    """Reads a stream event by event (gateway/pipeline/metering.py has one per protocol)."""

    def chunk(self, data: dict[str, Any]) -> int: ...
    def usage_of(self, data: dict[str, Any]) -> Any: ...
    def error_text(self, data: dict[str, Any]) -> str | None: ...
    def error_event(self, err: GatewayError) -> bytes: ...


class Send(Protocol):
    """One attempt at a deployment, for an API whose protocol is not every provider's own:
    sends `body` (the client's, model rewritten) and answers in the client's protocol."""

    def __call__(
        self, provider: Any, model: str, body: dict[str, Any], *, stream: bool,
        timeout_s: float, headers: Mapping[str, str], client_headers: Mapping[str, str],
    ) -> Awaitable[UpstreamResponse]: ...  # fmt: skip


def openai_error(exc: GatewayError, headers: Mapping[str, str]) -> Response:
    return exc.to_response(headers)


def anthropic_error(exc: GatewayError, headers: Mapping[str, str]) -> Response:
    """A gateway error in Anthropic's shape, so the Anthropic SDKs raise their own classes
    (by status: 401 AuthenticationError, 429 RateLimitError...). The gateway's own code
    (budget_exceeded, rate_limit_exceeded...) rides along in `error.code`; `request_id`
    is where Anthropic puts its own."""
    error: dict[str, Any] = {"type": anthropic_error_type(exc.status), "message": exc.message}
    if exc.code is not None:
        error["code"] = exc.code
    body: dict[str, Any] = {"type": "error", "error": error}
    if "x-request-id" in headers:
        body["request_id"] = headers["x-request-id"]
    return error_response(exc.status, body, {**exc.headers, **headers})


@dataclass(frozen=True, slots=True)
class Api:
    name: str  # the upstream operation: providers' OPERATION_PATHS key, token counting
    operation: str  # gen_ai.operation.name (semantic conventions' well-known values)
    required: str  # the body field it cannot do without
    required_list: bool = False  # ... which must then be a non-empty list
    streams: bool = True
    # a stream's usage must be asked for (stream_options.include_usage); else it comes anyway
    stream_usage: bool = False
    # the field a team's output cap is sent in when the client named none (None: by model)
    cap_field: str | None = None
    observe_body: Callable[[RequestContext, dict[str, Any]], None] = observe_body
    observer: Callable[[RequestContext], Observer] = StreamObserver
    check: Callable[[dict[str, Any]], None] | None = None  # the protocol's own 400s
    error_response: Callable[[GatewayError, Mapping[str, str]], Response] = openai_error
    # None: provider.send(name, ...); else how an attempt reaches any provider (gateway/pipeline/ingress.py)
    send: Send | None = None
    # the client's headers that go upstream as they are (the adapter decides where)
    client_headers: tuple[str, ...] = ()


def check_responses(body: dict[str, Any]) -> None:
    """A background response answers before it has run: its usage would only come from a
    later GET /v1/responses/{id}, which no budget sees. Refused rather than left unmetered."""
    if body.get("background") is True:
        raise InvalidRequest(
            "Background responses are not supported through the gateway: their usage could "
            "not be metered. Send the request without 'background'.",
            param="background",
        )


CHAT = Api("chat", "chat", "messages", required_list=True, stream_usage=True)
TEXT_COMPLETION = Api("text_completion", "text_completion", "prompt", stream_usage=True)
EMBEDDINGS = Api("embeddings", "embeddings", "input", streams=False)
# The Responses API is a chat operation (as OpenAI's own instrumentation names it); the
# route (url.path) tells it apart. Its streams always end with the usage (response.completed).
RESPONSES = Api(
    "responses",
    "chat",
    "input",
    cap_field="max_output_tokens",
    observe_body=observe_response,
    observer=ResponsesStreamObserver,
    check=check_responses,
)


def check_messages(body: dict[str, Any]) -> None:
    """Anthropic requires max_tokens (and the reservation is made from it)."""
    cap = body.get("max_tokens")
    if cap is None:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise InvalidRequest("max_tokens: Input should be a positive integer", param="max_tokens")


# Anthropic's Messages API (the Anthropic SDKs, Claude Code): native to `anthropic`
# deployments, translated to chat completions for every other kind (gateway/pipeline/ingress.py).
# Its name is the operation it is counted and metered as: a chat whose system prompt and
# content blocks the token counter reads. It answers in Anthropic's shape, errors included.
MESSAGES = Api(
    "chat",
    "chat",
    "messages",
    required_list=True,
    cap_field="max_tokens",
    observe_body=observe_message,
    observer=MessagesStreamObserver,
    check=check_messages,
    error_response=anthropic_error,
    send=ingress.send_messages,
    client_headers=ingress.ANTHROPIC_CLIENT_HEADERS,
)
# POST /v1/messages/count_tokens: parsed, authorized and routed like a message; answered by
# the first Anthropic deployment, else counted here (gateway/pipeline/count_tokens.py).
COUNT_TOKENS = Api(
    "chat",
    "count_tokens",
    "messages",
    required_list=True,
    streams=False,
    error_response=anthropic_error,
    send=ingress.send_count_tokens,
    client_headers=ingress.ANTHROPIC_CLIENT_HEADERS,
)

# by name, the APIs whose name is their own (MESSAGES and COUNT_TOKENS are counted as chat)
APIS = {api.name: api for api in (CHAT, TEXT_COMPLETION, EMBEDDINGS, RESPONSES)}
